"""The emotion classifier: pretrained audio + text encoders, cross-modal attention, pooling, MLP.

    input_values [B, S] ─ audio encoder → frames [B, T, D_a] ─ project → [B, T, d] ─┐ frame mask [B, T]
                                                                                 cross-attention both ways
    input_ids [B, L] ──── text encoder ─→ tokens [B, L, D_t] ─ project → [B, L, d] ─┘ token mask [B, L]
        → stats pooling per stream [B, 2d] each → concat [B, 4d] → MLP → logits [B, 4]

(B batch, S audio samples, T audio frames, L tokens, d = model.hidden_size.) The unimodal
baselines (`variant: audio` / `text`) build one encoder only: project → pool [B, 2d] → MLP.

Parameters whose names start with `audio_encoder.` or `text_encoder.` are the pretrained
encoders; everything else is the newly initialised head (for separate learning rates).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer
from transformers.utils import ModelOutput

from emotrain.config import LABEL_NAMES, SAMPLING_RATE, ModelConfig
from emotrain.model.cross_attention import CrossModalAttention
from emotrain.model.encoders import (
    build_audio_encoder,
    build_processors,
    build_text_encoder,
)
from emotrain.model.group_norm import set_group_norm_lengths
from emotrain.model.masks import (
    audio_frame_lengths,
    audio_sample_mask,
    lengths_to_mask,
    text_mask,
)
from emotrain.model.pooling import masked_mean_std

CONFIG_FILE = "emotion_model.json"
WEIGHTS_FILE = "model.safetensors"
AUDIO_ENCODER_DIR = "audio_encoder"  # the audio encoder's HF config.json
TEXT_ENCODER_DIR = "text_encoder"  # the text encoder's HF config.json
FEATURE_EXTRACTOR_DIR = "feature_extractor"
TOKENIZER_DIR = "tokenizer"
FORMAT = "emotrain.EmotionModel/1"
DEFAULT_PREPROCESSING = {"sampling_rate": SAMPLING_RATE, "max_text_tokens": 64, "max_audio_seconds": 15.0}


@dataclass
class EmotionModelOutput(ModelOutput):
    """What `EmotionModel.forward` returns (a transformers ModelOutput: DDP/Accelerate-friendly)."""

    logits: torch.Tensor | None = None
    """[B, num_labels] unnormalised class scores."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over the batch (scalar, float32) when labels were given, else None."""


class EmotionModel(nn.Module):
    """Speech emotion classifier over audio and/or text (see the module docstring for the shapes)."""

    def __init__(
        self,
        config: ModelConfig,
        audio_encoder_config: Any = None,
        text_encoder_config: Any = None,
        label_names: Sequence[str] = LABEL_NAMES,
    ):
        """Build from `config`. The encoders load their pretrained weights, unless their HF configs
        are given (then they are randomly initialised from them: `from_pretrained` loads weights).
        `label_names`: the classes, in the order of the logits (the prepared dataset's labels)."""
        super().__init__()
        config.validate()
        if len(label_names) < 2 or len(set(label_names)) != len(label_names):
            raise ValueError(f"label_names must be at least 2 distinct names, got {list(label_names)}")
        self.config = config
        self._label_names = tuple(str(name) for name in label_names)
        self.num_labels = len(self._label_names)
        self.uses_audio = config.variant in ("fusion", "audio")
        self.uses_text = config.variant in ("fusion", "text")
        self._processors: tuple[Any, Any] | None = None
        self.preprocessing = dict(DEFAULT_PREPROCESSING)
        """How inputs are prepared for this model (saved with it): sampling_rate, max_text_tokens and
        max_audio_seconds (the crop it trained on), as the run's `data` config had them."""
        d = config.hidden_size

        # Pretrained encoders; a unimodal baseline does not even build the other one.
        self.audio_encoder = build_audio_encoder(config, audio_encoder_config) if self.uses_audio else None
        self.text_encoder = build_text_encoder(config, text_encoder_config) if self.uses_text else None

        # Projections to the common width d (the head starts here).
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
            nn.Linear(config.classifier_hidden_size, self.num_labels),
        )

    # -----------------------------------------------------------------------------------------
    # Forward

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

    def forward(
        self,
        input_values: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> EmotionModelOutput:
        """Logits [B, num_labels] (and the cross-entropy loss when labels [B] are given).

        input_values [B, S] float, audio_lengths [B] long (valid samples per row): audio, needed
        unless variant is `text`. input_ids [B, L], attention_mask [B, L]: text, needed unless
        variant is `audio`. The other modality's inputs may be None.
        """
        if self.uses_audio:
            if input_values is None or audio_lengths is None:
                raise ValueError(f"variant {self.config.variant!r} needs input_values and audio_lengths")
            audio, audio_mask = self.encode_audio(input_values, audio_lengths)  # [B, T, d], [B, T]
        if self.uses_text:
            if input_ids is None or attention_mask is None:
                raise ValueError(f"variant {self.config.variant!r} needs input_ids and attention_mask")
            text, txt_mask = self.encode_text(input_ids, attention_mask)  # [B, L, d], [B, L]

        if self.config.variant == "fusion":
            # Audio frames attend to the words and words to the frames; padding is masked as keys.
            audio, text = self.cross_attention(audio, audio_mask, text, txt_mask)
            features = torch.cat(
                [masked_mean_std(audio, audio_mask), masked_mean_std(text, txt_mask)], dim=-1
            )  # [B, 4d]
        elif self.config.variant == "audio":
            features = masked_mean_std(audio, audio_mask)  # [B, 2d]
        else:
            features = masked_mean_std(text, txt_mask)  # [B, 2d]

        # Pooling computes in float32. Under autocast the classifier casts as it likes; a model cast
        # to bf16 as a whole (DeepSpeed bf16 runs without autocast) needs its own dtype back.
        logits = self.classifier(features.to(self.classifier[-1].weight.dtype))  # [B, num_labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        return EmotionModelOutput(logits=logits, loss=loss)

    @property
    def label_names(self) -> tuple[str, ...]:
        """The class names of the logits' columns."""
        return self._label_names

    # -----------------------------------------------------------------------------------------
    # Training switches

    def encoders(self) -> list[nn.Module]:
        """The pretrained encoders this variant has (one or two)."""
        return [e for e in (self.audio_encoder, self.text_encoder) if e is not None]

    def set_gradient_checkpointing(self, enabled: bool | str) -> None:
        """Recompute the encoders' transformer layers in backward (non-reentrant checkpointing):
        `True` both encoders, `"audio"` or `"text"` that one only, `False` none.

        Only in train mode (transformers checkpoints a layer only while `module.training`). The
        frozen conv feature encoder is never checkpointed: nothing to backpropagate through it.
        """
        # Non-reentrant: works with frozen inputs, DDP and unused outputs (reentrant does not).
        kwargs = {"use_reentrant": False}
        for modality, encoder in (("audio", self.audio_encoder), ("text", self.text_encoder)):
            if encoder is None:
                continue
            # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias).
            if enabled is True or enabled == modality:
                if hasattr(encoder, "activation_checkpointing_enable"):
                    encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            elif hasattr(encoder, "activation_checkpointing_disable"):
                encoder.activation_checkpointing_disable()
            else:
                encoder.gradient_checkpointing_disable()
        # transformers 5 wraps each conv layer of Wav2Vec2's feature encoder in checkpointing too,
        # frozen or not. A frozen stack at the input has nothing to recompute: leave it out.
        feature_encoder = getattr(self.audio_encoder, "feature_extractor", None)
        if feature_encoder is not None and not getattr(feature_encoder, "_requires_grad", True):
            for module in feature_encoder.modules():
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for e in self.encoders() for m in e.modules())

    # -----------------------------------------------------------------------------------------
    # Processors, saving and loading

    def processors(self) -> tuple[Any, Any]:
        """(feature_extractor, tokenizer) for this model; None for a modality it does not use.

        Loaded from the folder for a model from `from_pretrained`, else built from the config.
        """
        if self._processors is None:
            self._processors = build_processors(self.config)
        return self._processors

    def save_pretrained(
        self,
        directory: str | Path,
        processors: tuple[Any, Any] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write a self-contained folder that `from_pretrained` loads offline, without unpickling:

        emotion_model.json       the ModelConfig and the preprocessing settings (JSON)
        model.safetensors        the whole state dict (shared tensors deduplicated)
        audio_encoder/config.json, text_encoder/config.json   the encoders' HF configs
        feature_extractor/, tokenizer/                        the processors (`save_pretrained`)

        processors: (feature_extractor, tokenizer), default `self.processors()`.
        state_dict: the weights to write instead of this module's own, e.g. the gathered full
        state dict under ZeRO-3 (`accelerator.get_state_dict(model)`). Call on one process only.
        """
        if state_dict is not None and set(state_dict) != set(self.state_dict()):
            # A wrapper's names (`module.`, torch.compile's `_orig_mod.`) would give a folder that cannot be loaded.
            unknown = sorted(set(state_dict) - set(self.state_dict()))[:3]
            raise ValueError(f"state_dict does not hold this model's weights by their names (e.g. {unknown})")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "model_config": dataclasses.asdict(self.config), "preprocessing": self.preprocessing,
                "label_names": list(self.label_names)}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if self.audio_encoder is not None:
            self.audio_encoder.config.save_pretrained(directory / AUDIO_ENCODER_DIR)
        if self.text_encoder is not None:
            self.text_encoder.config.save_pretrained(directory / TEXT_ENCODER_DIR)
        feature_extractor, tokenizer = processors if processors is not None else self.processors()
        if feature_extractor is not None:
            feature_extractor.save_pretrained(directory / FEATURE_EXTRACTOR_DIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        if state_dict is None:
            save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            # Cloned: safetensors refuses tensors that share storage, and a view may be strided.
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> EmotionModel:
        """Load a folder written by `save_pretrained`: needs neither the hub nor the encoders' source
        folders (encoders are rebuilt from their saved HF configs, then all weights are loaded).
        Predictions from recordings: `emotrain.predict.load(directory).predict(path, text=...)`."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not an emotrain model folder (format {meta.get('format')!r})")
        config = _model_config_from_dict(meta["model_config"])
        audio_config = text_config = None
        if config.variant in ("fusion", "audio"):
            audio_config = AutoConfig.from_pretrained(directory / AUDIO_ENCODER_DIR)
        if config.variant in ("fusion", "text"):
            text_config = AutoConfig.from_pretrained(directory / TEXT_ENCODER_DIR)
        # A folder saved before label names were saved is IEMOCAP's 4-class model.
        model = cls(config, audio_encoder_config=audio_config, text_encoder_config=text_config,
                    label_names=meta.get("label_names") or LABEL_NAMES)
        load_model(model, directory / WEIGHTS_FILE, strict=True)
        model._processors = load_processors(directory)
        model.preprocessing.update(meta.get("preprocessing") or {})
        return model.to(device)


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


def load_processors(directory: str | Path) -> tuple[Any, Any]:
    """(feature_extractor, tokenizer) saved in a model folder; None for one that is absent."""
    directory = Path(directory)
    fe_dir, tok_dir = directory / FEATURE_EXTRACTOR_DIR, directory / TOKENIZER_DIR
    feature_extractor = AutoFeatureExtractor.from_pretrained(fe_dir) if fe_dir.is_dir() else None
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else None
    return feature_extractor, tokenizer


def _model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"saved model config has unknown keys {unknown} (saved by a newer emotrain?)")
    config = ModelConfig(**data)
    config.validate()
    return config


def build_model(model_cfg: ModelConfig, label_names: Sequence[str] = LABEL_NAMES) -> EmotionModel:
    """An EmotionModel from the config (loads pretrained encoder weights, or builds `tiny` ones),
    with one output per name of `label_names`."""
    return EmotionModel(model_cfg, label_names=label_names)
