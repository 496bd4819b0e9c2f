"""The emotion classifier's layers and forward, and the transformers model class around them.

    input_values [B, S] ─ audio encoder → frames [B, T, D_a] ─ project → [B, T, d] ─┐ frame mask [B, T]
                                                                                 cross-attention both ways
    input_ids [B, L] ──── text encoder ─→ tokens [B, L, D_t] ─ project → [B, L, d] ─┘ token mask [B, L]
        → stats pooling per stream [B, 2d] each → concat [B, 4d] → MLP → logits [B, num_labels]

(B batch, S audio samples, T audio frames, L tokens, d = hidden_size.) The unimodal variants
(`audio` / `text`) have one encoder only: project → pool [B, 2d] → MLP.

One definition, two users: `EmotionLayers` holds the layers after the encoders and the forward
through the whole model. emotrain's `EmotionModel` (training, predict, evaluate) and
`EmotrainForEmotionClassification` below (transformers' Auto classes, `pipeline`) both inherit it,
so they have the same parameter names and read the same `model.safetensors`.

This file, `configuration_emotrain.py` and the modules they import relatively (`cross_attention.py`,
`pooling.py`, `masks.py`, `group_norm.py`) are copied into every model folder emotrain writes:

    model = AutoModel.from_pretrained("runs/smoke/fold1/best", trust_remote_code=True)

So they import only torch and transformers, and each other relatively, never emotrain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_emotrain import EmotrainConfig
from .cross_attention import CrossModalAttention
from .group_norm import install_masked_group_norm, set_group_norm_lengths
from .masks import audio_frame_lengths, audio_sample_mask, lengths_to_mask, text_mask
from .pooling import masked_mean_std

REMOTE_CODE_FILES = ("configuration_emotrain.py", "modeling_emotrain.py", "cross_attention.py", "pooling.py",
                     "masks.py", "group_norm.py", "processing_emotrain.py")
"""The files of this package a model folder carries: this one, everything it imports, and the processor."""

PREPARED_MASK_MODELS = frozenset({"bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert", "mpnet"})
"""Text encoders that build their attention mask with transformers' `create_bidirectional_mask`, so a
prepared 4D mask means the same to them (checked against the 2D mask, sdpa and eager, fp32 and bf16)."""


def encoder_attention_mask(encoder: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B, L] (1 = token) as the text encoder's attention takes it, prepared here.

    Given a 2D mask, transformers first asks whether it holds any padding at all (`mask.all()`, to
    skip the mask when there is none): a host read, so a device sync in every forward. A prepared
    4D mask is used as given: [B, 1, 1, L] boolean (True = attend) for SDPA, additive (0 / the
    dtype's minimum) for eager attention. Other implementations (flash attention), and encoders not
    in PREPARED_MASK_MODELS, take the 2D mask.
    """
    if getattr(encoder.config, "model_type", None) not in PREPARED_MASK_MODELS:
        return attention_mask  # its own mask handling (DeBERTa) or extra patterns (ModernBERT's windows)
    implementation = getattr(encoder.config, "_attn_implementation", None)
    if implementation == "sdpa":
        return attention_mask[:, None, None, :].bool()
    if implementation == "eager":
        dtype = encoder.dtype
        return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return attention_mask


def drop_pooler(encoder: nn.Module) -> None:
    """Remove a text encoder's pooler. BERT/RoBERTa's pooler (a dense layer on [CLS]) is computed but
    never used here: its parameters would get no gradient (a DDP error) and waste compute. Their
    forward skips a `None` pooler."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


class EmotionLayers:
    """Mixin for an nn.Module whose `config` has `variant`, `hidden_size`, `cross_attention_layers`,
    `cross_attention_heads`, `dropout` and `classifier_hidden_size` (emotrain's ModelConfig or
    EmotrainConfig): `build_emotion_layers` adds the encoders and layers, `emotion_logits` runs them.

    Parameters whose names start with `audio_encoder.` or `text_encoder.` are the pretrained
    encoders; everything else is the newly initialised head (for separate learning rates).
    """

    def build_emotion_layers(self, audio_encoder: nn.Module | None, text_encoder: nn.Module | None,
                             num_labels: int) -> None:
        """Register the encoders (None for a modality the variant does not use), the projections,
        the cross-attention (fusion) and the classifier, in this order (the order of the parameters,
        so of the optimizer's state, and of the random initialisation)."""
        config = self.config
        self.uses_audio = config.variant in ("fusion", "audio")
        self.uses_text = config.variant in ("fusion", "text")
        d = config.hidden_size
        self.audio_encoder = audio_encoder if self.uses_audio else None
        self.text_encoder = text_encoder if self.uses_text else None
        if self.uses_audio:
            self.audio_projection = nn.Linear(self.audio_encoder.config.hidden_size, d)
        if self.uses_text:
            self.text_projection = nn.Linear(self.text_encoder.config.hidden_size, d)
        if config.variant == "fusion":
            self.cross_attention = CrossModalAttention(
                d, config.cross_attention_heads, config.cross_attention_layers, config.dropout
            )
        # Classifier over the pooled statistics: [B, 2d] per stream, concatenated.
        num_streams = 2 if config.variant == "fusion" else 1
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(num_streams * 2 * d, config.classifier_hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden_size, num_labels),
        )

    def encode_audio(
        self, input_values: torch.Tensor, audio_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_values [B, S] (zero-padded), audio_lengths [B] → frames [B, T, d], frame mask [B, T]."""
        encoder = self.audio_encoder
        audio_lengths = audio_lengths.to(input_values.device)
        # fp16/bf16 weights would otherwise receive the collator's float32 samples.
        input_values = input_values.to(encoder.dtype)
        # Every encoder gets the sample-level mask: the transformer then zeroes padded frames before
        # its positional convolution and never attends to them. A group-norm conv stack (wav2vec2-base)
        # takes its statistics over each utterance's real frames (`set_group_norm_lengths`), so the
        # frames are exactly those of the utterance alone for layer-norm and group-norm models.
        sample_mask = audio_sample_mask(audio_lengths, input_values.shape[1])  # [B, S]
        set_group_norm_lengths(encoder, audio_lengths)
        frames = encoder(input_values, attention_mask=sample_mask).last_hidden_state  # [B, T, D_a]

        frame_lengths = audio_frame_lengths(encoder, audio_lengths)  # [B]
        # Checked without reading the tensor on the host (no device sync in the training step); data
        # preparation and `predict` keep such audio out, so this only guards the invariant.
        torch._assert_async((frame_lengths >= 1).all(), "audio shorter than one frame of the audio encoder")
        mask = lengths_to_mask(frame_lengths, frames.shape[1])  # [B, T]
        return self.audio_projection(frames), mask

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L], attention_mask [B, L] → tokens [B, L, d], token mask [B, L]."""
        tokens = self.text_encoder(input_ids=input_ids, attention_mask=encoder_attention_mask(
            self.text_encoder, attention_mask)).last_hidden_state
        mask = text_mask(attention_mask)  # [B, L]
        torch._assert_async(mask.any(dim=1).all(), "every utterance needs at least one token (attention_mask row of zeros)")
        return self.text_projection(tokens), mask  # [B, L, d]

    def emotion_logits(
        self,
        input_values: torch.Tensor | None,
        audio_lengths: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits [B, num_labels].

        input_values [B, S] float, audio_lengths [B] long (valid samples per row): audio, needed
        unless variant is `text`. input_ids [B, L], attention_mask [B, L]: text, needed unless
        variant is `audio`. The other modality's inputs may be None.
        """
        variant = self.config.variant
        if self.uses_audio:
            if input_values is None or audio_lengths is None:
                raise ValueError(f"variant {variant!r} needs input_values and audio_lengths")
            audio, audio_mask = self.encode_audio(input_values, audio_lengths)  # [B, T, d], [B, T]
        if self.uses_text:
            if input_ids is None or attention_mask is None:
                raise ValueError(f"variant {variant!r} needs input_ids and attention_mask")
            text, txt_mask = self.encode_text(input_ids, attention_mask)  # [B, L, d], [B, L]

        if variant == "fusion":
            # Audio frames attend to the words and words to the frames; padding is masked as keys.
            audio, text = self.cross_attention(audio, audio_mask, text, txt_mask)
            features = torch.cat(
                [masked_mean_std(audio, audio_mask), masked_mean_std(text, txt_mask)], dim=-1
            )  # [B, 4d]
        elif variant == "audio":
            features = masked_mean_std(audio, audio_mask)  # [B, 2d]
        else:
            features = masked_mean_std(text, txt_mask)  # [B, 2d]

        # Pooling computes in float32. Under autocast the classifier casts as it likes; a model cast
        # to bf16 as a whole (DeepSpeed bf16 runs without autocast) needs its own dtype back.
        return self.classifier(features.to(self.classifier[-1].weight.dtype))  # [B, num_labels]


# ---------------------------------------------------------------------------------------------
# transformers: AutoModel, AutoModelForAudioClassification, pipeline("audio-classification").


class EmotrainPreTrainedModel(PreTrainedModel):
    config_class = EmotrainConfig
    base_model_prefix = "emotrain"
    main_input_name = "input_values"
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights a folder lacks (none in one emotrain wrote): the encoders initialise their own."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class EmotrainForEmotionClassification(EmotionLayers, EmotrainPreTrainedModel):
    """The emotion classifier as a transformers model (the same weights as emotrain's EmotionModel).

    `forward` takes what the folder's feature extractor and tokenizer give. `attention_mask` is the
    mask of the model's first input, as in Wav2Vec2 and BERT classifiers: the audio's sample mask
    when the model takes audio, the text's for a text-only model; a fusion model takes the text's
    mask as `text_attention_mask`.
    """

    def __init__(self, config: EmotrainConfig):
        super().__init__(config)
        audio_encoder = text_encoder = None
        if config.variant in ("fusion", "audio"):
            audio_encoder = AutoModel.from_config(config.audio_config)
            # Group norm over time counts the padding: normalise over each utterance's real frames.
            install_masked_group_norm(audio_encoder)
        if config.variant in ("fusion", "text"):
            text_encoder = AutoModel.from_config(config.text_config)
            drop_pooler(text_encoder)
        self.build_emotion_layers(audio_encoder, text_encoder, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        """logits [B, num_labels] (and the cross-entropy loss for labels [B]).

        input_values [B, S]: 16 kHz audio as the feature extractor normalised it; its valid samples
        per row from `audio_lengths` [B], else from the sample mask, else all of them.
        input_ids [B, L] and its mask (see the class docstring); no mask: every token is real.
        token_type_ids: ignored (one segment); other keyword arguments from pipelines are ignored.
        """
        if not self.uses_audio and text_attention_mask is None:
            text_attention_mask = attention_mask  # a text-only model: the mask is the text's
        if self.uses_audio and input_values is not None and audio_lengths is None:
            if attention_mask is not None:
                audio_lengths = attention_mask.sum(dim=-1)
            else:
                audio_lengths = torch.full((input_values.shape[0],), input_values.shape[-1], device=input_values.device)
        if self.uses_text and input_ids is not None and text_attention_mask is None:
            text_attention_mask = torch.ones_like(input_ids)
        logits = self.emotion_logits(input_values, audio_lengths, input_ids, text_attention_mask)
        loss = F.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
