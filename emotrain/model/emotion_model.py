"""emotrain's emotion classifier: the model of `emotrain.model.modeling_emotrain` (its layers, shapes
and forward: `EmotionLayers`), built from emotrain's `ModelConfig`, with the loss, the training
switches, and the model folder it is saved as and loaded from.

A model folder (a run's `best/`) is also a transformers model folder: `config.json` (an
`EmotrainConfig`, with `auto_map`), the modelling code (`REMOTE_CODE_FILES`), the weights, the
feature extractor and the tokenizer. transformers' Auto classes load it with `trust_remote_code=True`,
without emotrain installed; emotrain itself loads it through `EmotionModel.from_pretrained`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
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
from emotrain.model.configuration_emotrain import EmotrainConfig
from emotrain.model.encoders import (
    build_audio_encoder,
    build_processors,
    build_text_encoder,
)
from emotrain.model.modeling_emotrain import REMOTE_CODE_FILES, EmotionLayers

CONFIG_FILE = "emotion_model.json"
WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"  # the EmotrainConfig: the encoders' configs nested, the labels, auto_map
FEATURE_EXTRACTOR_FILE = "preprocessor_config.json"  # the feature extractor, saved in the folder itself
TOKENIZER_FILE = "tokenizer_config.json"  # the tokenizer, saved in the folder itself
# Folders written before the models became transformers folders (still loaded): the encoders' configs
# and the processors in subfolders.
LEGACY_ENCODER_DIRS = {"audio": "audio_encoder", "text": "text_encoder"}
LEGACY_PROCESSOR_DIRS = ("feature_extractor", "tokenizer")
FORMAT = "emotrain.EmotionModel/1"
DEFAULT_PREPROCESSING = {"sampling_rate": SAMPLING_RATE, "max_text_tokens": 64, "max_audio_seconds": 15.0}
AUTO_MAP = {
    "AutoConfig": "configuration_emotrain.EmotrainConfig",
    "AutoModel": "modeling_emotrain.EmotrainForEmotionClassification",
}
"""What transformers' Auto classes build from a model folder (`trust_remote_code=True`)."""
PIPELINE_AUTO_CLASS = {"audio": "AutoModelForAudioClassification", "text": "AutoModelForSequenceClassification"}
"""The Auto class of the pipeline a unimodal model runs in (audio- or text-classification). None for
fusion: no pipeline gives both inputs, so advertising one would promise what fails (no input_ids)."""
PROCESSOR_FILE = "processor_config.json"
PROCESSOR_CONFIG = {"processor_class": "EmotrainProcessor",
                    "auto_map": {"AutoProcessor": "processing_emotrain.EmotrainProcessor"}}
"""A fusion folder's AutoProcessor: its feature extractor and tokenizer together (processing_emotrain.py)."""


def with_attention_mask(feature_extractor: Any) -> Any:
    """A copy of `feature_extractor` that gives the sample mask by default (`return_attention_mask`).

    A group-norm encoder's own preprocessor config (wav2vec2-base's) says false, so a transformers
    user padding a batch (`padding=True`, `pipeline(batch_size=...)`) would get no mask and the model
    would count the padding as audio. This model normalises over each utterance's real samples (its
    masked group norm) and needs the mask whatever the encoder; emotrain's batches always ask for it."""
    if getattr(feature_extractor, "return_attention_mask", True):
        return feature_extractor
    saved = copy.deepcopy(feature_extractor)
    saved.return_attention_mask = True
    return saved


@dataclass
class EmotionModelOutput(ModelOutput):
    """What `EmotionModel.forward` returns (a transformers ModelOutput: DDP/Accelerate-friendly)."""

    logits: torch.Tensor | None = None
    """[B, num_labels] unnormalised class scores."""
    loss: torch.Tensor | None = None
    """Mean cross-entropy over the batch (scalar, float32) when labels were given, else None."""


class EmotionModel(EmotionLayers, nn.Module):
    """Speech emotion classifier over audio and/or text (shapes: `emotrain.model.modeling_emotrain`)."""

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
        self._processors: tuple[Any, Any] | None = None
        self.preprocessing = dict(DEFAULT_PREPROCESSING)
        """How inputs are prepared for this model (saved with it): sampling_rate, max_text_tokens and
        max_audio_seconds (the crop it trained on), as the run's `data` config had them."""
        # Pretrained encoders; a unimodal baseline does not even build the other one.
        uses_audio, uses_text = config.variant in ("fusion", "audio"), config.variant in ("fusion", "text")
        audio_encoder = build_audio_encoder(config, audio_encoder_config) if uses_audio else None
        text_encoder = build_text_encoder(config, text_encoder_config) if uses_text else None
        self.build_emotion_layers(audio_encoder, text_encoder, self.num_labels)

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
        logits = self.emotion_logits(input_values, audio_lengths, input_ids, attention_mask)  # [B, num_labels]
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
        """Write a self-contained folder that `from_pretrained` loads offline, without unpickling, and
        that transformers loads too (`AutoModel.from_pretrained(directory, trust_remote_code=True)`):

        emotion_model.json       the ModelConfig and the preprocessing settings (JSON)
        model.safetensors        the whole state dict (shared tensors deduplicated)
        config.json              the EmotrainConfig: the encoders' HF configs, the labels, auto_map
        *.py                     the modelling code transformers runs (REMOTE_CODE_FILES)
        preprocessor_config.json, tokenizer files   the processors (`save_pretrained`), as the variant needs;
                                 the feature extractor gives the attention mask by default (`with_attention_mask`)
        processor_config.json    (fusion) AutoProcessor's EmotrainProcessor: both processors together

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
        self.transformers_config().save_pretrained(directory)
        code = Path(__file__).parent
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(code / name, directory / name)
        feature_extractor, tokenizer = processors if processors is not None else self.processors()
        if feature_extractor is not None:
            feature_extractor = with_attention_mask(feature_extractor)
        for processor in (feature_extractor, tokenizer):
            if processor is not None:
                processor.save_pretrained(directory)
        if feature_extractor is not None and tokenizer is not None:  # AutoProcessor: both, called together
            (directory / PROCESSOR_FILE).write_text(json.dumps(PROCESSOR_CONFIG, indent=2) + "\n")
        if state_dict is None:
            save_model(self, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            # Cloned: safetensors refuses tensors that share storage, and a view may be strided.
            tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
            save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    def transformers_config(self) -> EmotrainConfig:
        """This model's settings as transformers' config (config.json), with the Auto classes' `auto_map`."""
        cfg = self.config
        config = EmotrainConfig(
            variant=cfg.variant,
            audio_config=self.audio_encoder.config if self.audio_encoder is not None else None,
            text_config=self.text_encoder.config if self.text_encoder is not None else None,
            hidden_size=cfg.hidden_size, cross_attention_layers=cfg.cross_attention_layers,
            cross_attention_heads=cfg.cross_attention_heads, dropout=cfg.dropout,
            classifier_hidden_size=cfg.classifier_hidden_size,
            sampling_rate=self.preprocessing["sampling_rate"],
            max_audio_seconds=self.preprocessing["max_audio_seconds"],
            max_text_tokens=self.preprocessing["max_text_tokens"],
            id2label=dict(enumerate(self.label_names)), label2id={name: i for i, name in enumerate(self.label_names)},
        )
        config.auto_map = dict(AUTO_MAP)
        if cfg.variant in PIPELINE_AUTO_CLASS:
            config.auto_map[PIPELINE_AUTO_CLASS[cfg.variant]] = AUTO_MAP["AutoModel"]
        config.architectures = ["EmotrainForEmotionClassification"]
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> EmotionModel:
        """Load a folder written by `save_pretrained`: needs neither the hub nor the encoders' source
        folders (encoders are rebuilt from their saved HF configs, then all weights are loaded).
        Folders written before config.json existed (encoder configs and processors in subfolders) load too.
        Predictions from recordings: `emotrain.predict.load(directory).predict(path, text=...)`."""
        directory = Path(directory)
        meta = json.loads((directory / CONFIG_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}: not an emotrain model folder (format {meta.get('format')!r})")
        config = _model_config_from_dict(meta["model_config"])
        audio_config, text_config = _encoder_configs(directory)
        # A folder saved before label names were saved is IEMOCAP's 4-class model.
        model = cls(config, audio_encoder_config=audio_config, text_encoder_config=text_config,
                    label_names=meta.get("label_names") or LABEL_NAMES)
        load_model(model, directory / WEIGHTS_FILE, strict=True)
        model._processors = load_processors(directory)
        model.preprocessing.update(meta.get("preprocessing") or {})
        return model.to(device)


def _encoder_configs(directory: Path) -> tuple[Any, Any]:
    """(audio, text) encoder HF configs of a model folder: from config.json, or from the subfolders of
    a folder written before it existed; None for a modality the folder has no encoder for."""
    if (directory / HF_CONFIG_FILE).is_file():
        config = EmotrainConfig.from_pretrained(directory)
        return config.audio_config, config.text_config
    found = [directory / LEGACY_ENCODER_DIRS[modality] for modality in ("audio", "text")]
    return tuple(AutoConfig.from_pretrained(folder) if folder.is_dir() else None for folder in found)


def load_processors(directory: str | Path) -> tuple[Any, Any]:
    """(feature_extractor, tokenizer) saved in a model folder (or, in one written before they were
    saved in the folder itself, in its subfolders); None for one that is absent."""
    directory = Path(directory)
    feature_extractor = tokenizer = None
    source = directory if (directory / FEATURE_EXTRACTOR_FILE).is_file() else directory / LEGACY_PROCESSOR_DIRS[0]
    if source.is_dir():
        feature_extractor = AutoFeatureExtractor.from_pretrained(source)
    if (directory / TOKENIZER_FILE).is_file():
        # Given the folder's config, AutoTokenizer does not read config.json itself (it would ask
        # whether to trust the folder's code: the tokenizer's class is in tokenizer_config.json).
        tokenizer = AutoTokenizer.from_pretrained(directory, config=EmotrainConfig.from_pretrained(directory))
    elif (directory / LEGACY_PROCESSOR_DIRS[1]).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(directory / LEGACY_PROCESSOR_DIRS[1])
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
