"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard); rank 0 only.

A W&B run id is created once per training run and stored in every checkpoint, so a resumed or
requeued job continues the same run (`resume="allow"`). W&B plots every metric against our own
`train/step` and gets no step of its own (it drops points whose internal step is lower than one it
already has, which is what happens after resuming from a checkpoint older than the last logged
point); TensorBoard gets the optimizer step as its step (it plots a later point at an earlier step
as a second value there, which a resumed run's repeated steps are).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm

from emotrain.config import Config, LoggingConfig
from emotrain.train.run_folder import HISTORY_FILE, RunFolder  # noqa: F401 (HISTORY_FILE: also imported from here)

STEP_METRIC = "train/step"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_name(cfg: Config) -> str:
    return cfg.logging.run_name or f"{cfg.experiment}-fold{cfg.data.fold}"


def flat_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """`{"train.lr": 2e-05, "logging.report_to": "wandb,tensorboard", ...}`: the scalars that
    TensorBoard's hparams accept (no nesting, lists joined, None spelled out); W&B takes them as is."""
    flat: dict[str, int | float | str | bool] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                flat[prefix + key] = ",".join(map(str, value))
            elif value is None:
                flat[prefix + key] = "None"
            else:
                flat[prefix + key] = value

    walk(cfg.to_dict(), "")
    return flat


WANDB_ENV = {"mode": "WANDB_MODE", "project": "WANDB_PROJECT", "entity": "WANDB_ENTITY", "dir": "WANDB_DIR",
             "group": "WANDB_RUN_GROUP", "tags": "WANDB_TAGS"}
"""W&B's own environment variables for the settings we pass to `wandb.init`, by setting."""


@dataclass(frozen=True)
class WandbSettings:
    """What a W&B run is opened with, and where each value came from (`config`, the environment
    variable's name, or `default`). Passed to `wandb.init` explicitly: its arguments win over the
    environment, so what we resolved is what it uses."""

    mode: str
    project: str
    entity: str | None
    dir: str
    group: str
    tags: list[str]
    sources: dict[str, str]

    def init_kwargs(self) -> dict:
        return {"mode": self.mode, "project": self.project, "entity": self.entity, "dir": self.dir,
                "group": self.group, "tags": list(self.tags)}

    def describe(self) -> str:
        """`W&B: mode offline (default), project emotrain (WANDB_PROJECT), ...`: one line for the log."""
        shown = {"mode": self.mode, "project": self.project, "entity": self.entity, "group": self.group,
                 "tags": ",".join(self.tags) or None, "dir": self.dir}
        return "W&B: " + ", ".join(f"{name} {value} ({self.sources[name]})" for name, value in shown.items()
                                   if value is not None)


def wandb_settings(logging_cfg: LoggingConfig, environ: Mapping[str, str], *, default_dir: str | Path,
                   default_group: str) -> WandbSettings:
    """The W&B settings of a run (training or the report's summary run). A value the config gives
    wins; a setting the config leaves unset (null; tags: empty) follows W&B's own environment
    variable (`WANDB_ENV`: WANDB_MODE=online, WANDB_PROJECT, WANDB_TAGS=a,b ...); else our default:
    offline (compute nodes are often offline: `wandb sync` later), project `emotrain`, the run
    folder (`default_dir`), the experiment's group (`default_group`), no tags."""
    configured = {"mode": logging_cfg.wandb_mode, "project": logging_cfg.project, "entity": logging_cfg.entity,
                  "dir": None, "group": logging_cfg.group, "tags": list(logging_cfg.tags) or None}
    defaults = {"mode": "offline", "project": "emotrain", "entity": None, "dir": str(default_dir),
                "group": default_group, "tags": []}
    values, sources = {}, {}
    for name, variable in WANDB_ENV.items():
        if configured[name] is not None:
            values[name], sources[name] = configured[name], "config"
        elif environ.get(variable, "").strip():
            text = environ[variable].strip()
            values[name] = [tag.strip() for tag in text.split(",") if tag.strip()] if name == "tags" else text
            sources[name] = variable
        else:
            values[name], sources[name] = defaults[name], "default"
    return WandbSettings(**values, sources=sources)


def init_kwargs(cfg: Config, run_id: str, environ: Mapping[str, str] | None = None) -> dict:
    """Per-tracker keyword arguments for `accelerator.init_trackers` (`environ`: os.environ by default)."""
    kwargs: dict = {}
    if "wandb" in cfg.logging.report_to:
        settings = training_wandb_settings(cfg, os.environ if environ is None else environ)
        Path(settings.dir).mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {**settings.init_kwargs(), "id": run_id, "resume": "allow", "name": run_name(cfg),
                           "job_type": f"fold{cfg.data.fold}"}
    return kwargs


def training_wandb_settings(cfg: Config, environ: Mapping[str, str]) -> WandbSettings:
    """`wandb_settings` of a training run: files in its run folder, grouped by experiment by default."""
    return wandb_settings(cfg.logging, environ, default_dir=cfg.output_dir, default_group=cfg.experiment)


def start(accelerator, cfg: Config, run_id: str) -> None:
    """Open the trackers on every rank (Accelerate itself restricts them to the main process)."""
    kwargs = init_kwargs(cfg, run_id)
    # Accelerate hands the project name to W&B as `project` (and to TensorBoard as its folder's name).
    project = kwargs["wandb"].pop("project") if "wandb" in kwargs else cfg.logging.project or "emotrain"
    if "wandb" in kwargs:
        # The service's own console chatter would interleave with our log on every rank.
        os.environ.setdefault("WANDB_SILENT", "true")
        if accelerator.is_main_process:
            logging.getLogger("emotrain").info("%s", training_wandb_settings(cfg, os.environ).describe())
    accelerator.init_trackers(
        project_name=project,
        config=flat_config(cfg),  # plain config data; secrets (API keys) live only in the environment
        init_kwargs=kwargs,
    )
    if "wandb" in cfg.logging.report_to and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)


class HistoryTracker(GeneralTracker):
    """An Accelerate tracker that appends every logged dict to `output_dir/history.jsonl` (rank 0).

    Always on, whatever `logging.report_to` says: the run folder keeps its own curves for `emotrain
    report`. Resumed at step s (`keep_until(s)` before `init_trackers`), it first drops what the
    interrupted run logged after s — those steps are trained again — so the file ends equal to an
    uninterrupted run's, like the W&B history.
    """

    name = "emotrain-history"
    requires_logging_directory = False

    def __init__(self, output_dir: str | Path):
        super().__init__()
        self.path = RunFolder(output_dir).history
        self.resumed_step: int | None = None
        self._handle = None

    def keep_until(self, step: int | None) -> None:
        """Keep what was logged up to `step` (a resumed run's step; None: a fresh run keeps nothing)."""
        self.resumed_step = step

    @property
    def tracker(self):
        return self._handle

    def start(self) -> None:
        kept = [] if self.resumed_step is None else [
            line for line in _history_lines(self.path) if json.loads(line).get(STEP_METRIC, 0) <= self.resumed_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, self.path)  # a kill here leaves the old file or the new one, never half of one
        self._handle = open(self.path, "a", buffering=1)

    def store_init_configuration(self, values: dict) -> None:
        pass  # the run folder's config.yaml holds it

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        record = {key: _plain(value) for key, value in values.items()}
        self._handle.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value


def _history_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except ValueError:
            break  # a line cut by a kill mid-write ends what can be trusted
        lines.append(line)
    return lines


def read_history(path: str | Path) -> list[dict]:
    """The records of a history file merged per step (a later value of a key wins), by step."""
    merged: dict[int, dict] = {}
    for line in _history_lines(Path(path)):
        record = json.loads(line)
        merged.setdefault(int(record.get(STEP_METRIC, 0)), {}).update(record)
    return [merged[step] for step in sorted(merged)]


def log(accelerator, values: dict, step: int) -> None:
    """Log scalars at optimizer step `step`, as each tracker plots them: TensorBoard (and any other
    tracker) gets it as its step; W&B gets it as `train/step`, its x-axis (`define_metric`), and no
    step of its own (see the module docstring). Trackers live on the main process only."""
    values = {**values, STEP_METRIC: step}
    for tracker in accelerator.trackers:
        tracker.log(values, step=None if tracker.name == "wandb" else step)


def evaluation_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """The trackers' scalars of one evaluation (`evaluate`'s result) under `prefix` (`eval`, as the HF
    Trainer names validation, or `test`): `<prefix>/loss` when it was computed, `wa`, `ua`,
    `macro_f1`, and `recall_<class>` for each class that has utterances there."""
    values = {f"{prefix}/{key}": metrics[key] for key in ("loss", "wa", "ua", "macro_f1") if metrics.get(key) is not None}
    values |= {f"{prefix}/recall_{name}": recall for name, recall in metrics["per_class_recall"].items()
               if recall is not None}
    return values


def confusion_chart(confusion: list[list[int]], label_names, title: str):
    """W&B's confusion-matrix chart (`wandb.plot.confusion_matrix`, rows = true class) of a matrix of
    counts: it takes one (true, predicted) pair per utterance, which the counts give back."""
    import wandb

    y_true = [i for i, row in enumerate(confusion) for j, count in enumerate(row) for _ in range(int(count))]
    preds = [j for row in confusion for j, count in enumerate(row) for _ in range(int(count))]
    return wandb.plot.confusion_matrix(y_true=y_true, preds=preds, class_names=list(label_names), title=title)


def log_confusion(accelerator, cfg: Config, split: str, confusion: list[list[int]], label_names, step: int) -> None:
    """The confusion matrix as W&B's confusion-matrix chart, `<split>/confusion`; the other trackers
    get the scalars only."""
    if not accelerator.is_main_process or "wandb" not in cfg.logging.report_to:
        return
    run = accelerator.get_tracker("wandb", unwrap=True)
    chart = confusion_chart(confusion, label_names, title=f"{split} confusion (step {step})")
    run.log({f"{split}/confusion": chart, STEP_METRIC: step})


def summarize(accelerator, cfg: Config, summary: dict) -> None:
    if accelerator.is_main_process and "wandb" in cfg.logging.report_to:
        run = accelerator.get_tracker("wandb", unwrap=True)
        for key, value in summary.items():
            run.summary[key] = value


class _TqdmConsoleHandler(logging.StreamHandler):
    """Console lines written through tqdm, so they do not tear the progress bar apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class _RunLogFileHandler(logging.FileHandler):
    """train.log. A line that cannot be written (the disk is full) is reported once, in one line, and
    the console keeps every line: logging's default would print a traceback for each line lost."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            err = sys.exc_info()[1]
            reason = getattr(err, "strerror", None) or err
            print(f"emotrain: cannot write {self.baseFilename} ({reason}): from here on the log is on the console "
                  "only", file=sys.stderr)


FILE_ONLY = {"file_only": True}
"""`log.info(..., extra=FILE_ONLY)`: a record for train.log that the console leaves out."""


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def setup_logging(output_dir: str | Path, is_main_process: bool) -> logging.Logger:
    """`emotrain` logs to the console and `output_dir/train.log` on rank 0; other ranks report only
    their own data problems (`emotrain.data` warnings) and errors."""
    logger = logging.getLogger("emotrain")
    logger.handlers.clear()
    logger.propagate = False
    if is_main_process:
        logger.setLevel(logging.INFO)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        console = _TqdmConsoleHandler()
        console.addFilter(_not_file_only)
        for handler in (console, _RunLogFileHandler(RunFolder(output_dir).log)):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        # The recipe's own messages are the same on every rank: rank 0 says them. What only this
        # rank knows (an utterance it could not decode, a shard it could not read) it says itself.
        logger.setLevel(logging.ERROR)
        logging.getLogger("emotrain.data").setLevel(logging.WARNING)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s [rank %(process)d] %(message)s"))
        logger.addHandler(handler)
    return logger
