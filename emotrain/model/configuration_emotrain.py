"""The settings of an emotrain model as a transformers config (`config.json` of a model folder).

This file is copied into every model folder emotrain writes (a run's `best/`), beside
`modeling_emotrain.py`, so that transformers loads the model without emotrain installed:

    AutoConfig.from_pretrained("runs/smoke/fold1/best", trust_remote_code=True)

It may therefore import only torch and transformers (and its siblings, relatively). emotrain's own
`ModelConfig` (emotrain.config) is the training-side source of these settings; `EmotionModel`
writes this config from it when it saves a folder.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

VARIANTS = ("fusion", "audio", "text")


def _encoder_config(value: Any) -> PretrainedConfig | None:
    """A sub-config as saved in config.json (a dict with its `model_type`) → its transformers config."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    settings = dict(value)
    settings.pop("transformers_version", None)
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


class EmotrainConfig(PretrainedConfig):
    """An emotion classifier over audio and/or text: pretrained encoders (their own configs nested
    here), projections to a common width, cross-modal attention (fusion), statistics pooling, MLP.

    variant: `fusion` (audio + text), `audio` or `text` (unimodal baselines).
    audio_config / text_config: the encoders' transformers configs (None for an unused modality).
    hidden_size, cross_attention_layers, cross_attention_heads, dropout, classifier_hidden_size:
        the layers after the encoders, as emotrain's `model.*` settings of the same names.
    sampling_rate, max_audio_seconds, max_text_tokens: how the inputs were prepared in training.
    id2label / label2id: the classes, in the order of the logits.
    """

    model_type = "emotrain"

    def __init__(
        self,
        variant: str = "fusion",
        audio_config: Any = None,
        text_config: Any = None,
        hidden_size: int = 256,
        cross_attention_layers: int = 1,
        cross_attention_heads: int = 4,
        dropout: float = 0.1,
        classifier_hidden_size: int = 256,
        sampling_rate: int = 16_000,
        max_audio_seconds: float | None = None,
        max_text_tokens: int | None = None,
        **kwargs: Any,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.audio_config = _encoder_config(audio_config)
        self.text_config = _encoder_config(text_config)
        self.hidden_size = hidden_size
        self.cross_attention_layers = cross_attention_layers
        self.cross_attention_heads = cross_attention_heads
        self.dropout = dropout
        self.classifier_hidden_size = classifier_hidden_size
        self.sampling_rate = sampling_rate
        self.max_audio_seconds = max_audio_seconds
        self.max_text_tokens = max_text_tokens
        super().__init__(**kwargs)
