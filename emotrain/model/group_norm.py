"""Padding-invariant group norm for the conv front end of group-norm audio encoders.

wav2vec2-base (HuBERT-base, WavLM-base, UniSpeech...: `feat_extract_norm == "group"`) normalises
the output of its first conv layer, [B, C, T1], per channel over the whole time axis. In a padded
batch that axis includes the padding, so an utterance's frames would depend on which utterances
share its batch. `LengthMaskedGroupNorm` takes those statistics over each row's real frames only:
exactly the statistics of the utterance alone, in one batched pass (no per-utterance loop, no
host read of the lengths). The frames after it depend only on real frames (every later conv is
local and unpadded: a frame whose receptive field lies inside the utterance reads no padding), and
the transformer gets the frame-level attention mask, which zeroes padded frames before the
positional convolution and hides them as attention keys. So a padded utterance gives exactly the
frames it gives alone.

    install_masked_group_norm(encoder)          # once, after building/loading the encoder
    set_group_norm_lengths(encoder, audio_lengths)   # before each call, for that batch
    encoder(input_values, attention_mask=sample_mask)
"""

from __future__ import annotations

import torch
from torch import nn

# Relative: this file also ships inside model folders, where emotrain is not installed (modeling_emotrain).
from .masks import lengths_to_mask


class LengthMaskedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm over [B, C, T] whose statistics count only row b's first `valid_frames[b]` frames.

    With `valid_frames` None it is nn.GroupNorm. Same parameters (`weight`, `bias`) and no buffers,
    so state dicts and checkpoints are unchanged. Statistics are computed in float32 with autocast
    off (autocast runs group_norm in float32 too); padded frames come out as the bias (their
    values are never read by a real frame).
    """

    valid_frames: torch.Tensor | None = None
    """[B] long, the real frames of each row of the input; set by `set_group_norm_lengths` and kept
    until its next call, so a backward that recomputes the conv layers (gradient checkpointing)
    normalises over the same frames as the forward did."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.valid_frames is None:
            return super().forward(hidden)
        batch, channels, frames = hidden.shape
        if self.valid_frames.shape[0] != batch:
            raise RuntimeError(f"the group norm was given the lengths of {self.valid_frames.shape[0]} utterances for a "
                               f"batch of {batch}: call set_group_norm_lengths(encoder, audio_lengths) before the encoder")
        # Under autocast group_norm returns float32; without it (a model cast to bf16) the input's dtype.
        out_dtype = torch.float32 if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        valid = self.valid_frames.to(hidden.device)
        per_group = channels // self.num_groups
        with torch.autocast(hidden.device.type, enabled=False):
            padding = ~lengths_to_mask(valid, frames)[:, None, :]  # [B, 1, T]
            # clamp: a row shorter than the conv's kernel (rejected later by the model) stays finite.
            count = (valid.clamp(min=1) * per_group).float()[:, None]  # [B, 1] values per group
            # Two passes (mean, then squared deviations), as nn.GroupNorm: exact also when the mean
            # dwarfs the spread. Elementwise sums, not matmuls (which TF32 would round). In place on
            # our own copy where autograd allows (the input is never written).
            centred = hidden.float().masked_fill(padding, 0.0)  # [B, C, T], padding 0
            mean = _group_average(centred.sum(dim=2), count, per_group)  # [B, C]
            centred = centred.sub_(mean[..., None]).masked_fill_(padding, 0.0)
            variance = _group_average(centred.square().sum(dim=2), count, per_group)  # [B, C], biased as nn.GroupNorm
            scale = torch.rsqrt(variance + self.eps)
            if self.affine:
                scale = scale * self.weight.float()
            shift = self.bias.float().expand_as(scale) if self.affine else torch.zeros_like(scale)
            if torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in self.parameters())):
                normalised = torch.addcmul(shift[..., None], centred, scale[..., None])  # [B, C, T]
            else:  # a frozen conv stack (the default for a pretrained encoder): no fourth allocation
                normalised = centred.mul_(scale[..., None]).add_(shift[..., None])
        return normalised.to(out_dtype)


def _group_average(sums: torch.Tensor, count: torch.Tensor, per_group: int) -> torch.Tensor:
    """Per-channel sums [B, C] → each channel's group average [B, C]: the sum over its group (of
    `per_group` adjacent channels) divided by `count` [B, 1] values."""
    batch, channels = sums.shape
    group_sums = sums.reshape(batch, channels // per_group, per_group).sum(dim=2)  # [B, G]
    return (group_sums / count).repeat_interleave(per_group, dim=1)


def _conv_layers(encoder: nn.Module) -> list[nn.Module]:
    """The conv feature encoder's layers (`feature_extractor.conv_layers`), or [] if it has none."""
    return list(getattr(getattr(encoder, "feature_extractor", None), "conv_layers", None) or [])


def install_masked_group_norm(encoder: nn.Module) -> int:
    """Replace each nn.GroupNorm of the encoder's conv layers by a LengthMaskedGroupNorm holding the
    same Parameter objects (names, values, requires_grad and device unchanged). Returns how many:
    1 for a group-norm encoder (its first conv layer), 0 for a layer-norm one."""
    replaced = 0
    for layer in _conv_layers(encoder):
        norm = getattr(layer, "layer_norm", None)
        if type(norm) is nn.GroupNorm:
            masked = LengthMaskedGroupNorm(norm.num_groups, norm.num_channels, norm.eps, affine=norm.affine)
            if norm.affine:
                masked.weight, masked.bias = norm.weight, norm.bias
            layer.layer_norm = masked
            replaced += 1
    return replaced


def conv_output_lengths(conv: nn.Conv1d, lengths: torch.Tensor) -> torch.Tensor:
    """lengths [B] → the frames `conv` makes of them: floor((L + 2p - d(k-1) - 1) / s) + 1."""
    span = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    return torch.div(lengths + 2 * conv.padding[0] - span, conv.stride[0], rounding_mode="floor") + 1


def set_group_norm_lengths(encoder: nn.Module, audio_lengths: torch.Tensor) -> None:
    """From now on, the encoder's LengthMaskedGroupNorms normalise over the real frames of utterances
    of `audio_lengths` [B] samples (the batch the encoder is called on next). They keep them until
    the next call: gradient checkpointing recomputes the conv layers during backward, after the
    forward, and must see the same frames."""
    lengths = audio_lengths
    for layer in _conv_layers(encoder):
        lengths = conv_output_lengths(layer.conv, lengths)
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, LengthMaskedGroupNorm):
            norm.valid_frames = lengths
