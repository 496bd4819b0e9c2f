"""Padding masks: which time steps of a padded batch are real.

Convention everywhere in `emotrain.model`: a mask is a bool tensor [B, T], True = a real step,
False = padding. Every stage after the encoders (cross-attention keys, pooling) reads these masks,
so padding never leaks into an utterance's features.
"""

from __future__ import annotations

import torch
from torch import nn


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """lengths [B] (int) → mask [B, max_length] (bool), True for positions < length."""
    positions = torch.arange(max_length, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def audio_sample_mask(audio_lengths: torch.Tensor, num_samples: int) -> torch.Tensor:
    """audio_lengths [B] → the encoder's sample-level attention mask [B, T_samples] (long, 1 = real)."""
    return lengths_to_mask(audio_lengths, num_samples).long()


def audio_frame_lengths(audio_encoder: nn.Module, audio_lengths: torch.Tensor) -> torch.Tensor:
    """audio_lengths [B] (samples) → frames [B] the conv feature encoder produces from them.

    Uses the encoder's own length formula (`_get_feat_extract_output_lengths`: each conv layer
    maps L → floor((L - kernel) / stride) + 1), so it agrees with the model's internal masking.
    """
    return audio_encoder._get_feat_extract_output_lengths(audio_lengths).long()


def audio_frame_mask(audio_encoder: nn.Module, audio_lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """audio_lengths [B] (samples) → frame mask [B, num_frames] (bool, True = real frame).

    A frame counts as real when its whole receptive field lies inside the utterance, which is
    exactly the frames the utterance would give unpadded.
    """
    return lengths_to_mask(audio_frame_lengths(audio_encoder, audio_lengths), num_frames)


def text_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The tokenizer's attention_mask [B, L] (0/1) → token mask [B, L] (bool, True = real token)."""
    return attention_mask.bool()
