"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard); rank 0 only.

A W&B run id is created once per training run and stored in every checkpoint, so a resumed or
requeued job continues the same run (`resume="allow"`). All metrics are plotted against our own
`train/step` (W&B drops points whose internal step is lower than one it already has, which is what
happens after resuming from a checkpoint older than the last logged point).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

from tqdm.auto import tqdm

from emotrain.config import Config

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


def init_kwargs(cfg: Config, run_id: str) -> dict:
    """Per-tracker keyword arguments for `accelerator.init_trackers`."""
    kwargs: dict = {}
    if "wandb" in cfg.logging.report_to:
        wandb_dir = Path(cfg.output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {
            "id": run_id,
            "resume": "allow",
            "name": run_name(cfg),
            "group": cfg.logging.group or cfg.experiment,
            "job_type": f"fold{cfg.data.fold}",
            "tags": list(cfg.logging.tags),
            "entity": cfg.logging.entity,
            "mode": cfg.logging.wandb_mode,
            "dir": str(wandb_dir),
        }
    return kwargs


def start(accelerator, cfg: Config, run_id: str) -> None:
    """Open the trackers on every rank (Accelerate itself restricts them to the main process)."""
    if not cfg.logging.report_to:
        return
    if "wandb" in cfg.logging.report_to:
        # The service's own console chatter would interleave with our log on every rank.
        os.environ.setdefault("WANDB_SILENT", "true")
    accelerator.init_trackers(
        project_name=cfg.logging.project,
        config=flat_config(cfg),  # plain config data; secrets (API keys) live only in the environment
        init_kwargs=init_kwargs(cfg, run_id),
    )
    if "wandb" in cfg.logging.report_to and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)


def log(accelerator, values: dict, step: int) -> None:
    """Log scalars against `train/step` (no tracker-side step, see the module docstring)."""
    if accelerator.trackers:
        accelerator.log({**values, STEP_METRIC: step})


def log_confusion(accelerator, cfg: Config, split: str, confusion: list[list[int]], label_names, step: int) -> None:
    """The confusion matrix as a W&B table (rows = true class); TensorBoard gets the scalars only."""
    if not accelerator.is_main_process or "wandb" not in cfg.logging.report_to:
        return
    import wandb

    run = accelerator.get_tracker("wandb", unwrap=True)
    rows = [[true, pred, confusion[i][j]] for i, true in enumerate(label_names) for j, pred in enumerate(label_names)]
    run.log({f"{split}/confusion": wandb.Table(columns=["true", "predicted", "count"], data=rows), STEP_METRIC: step})


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
        for handler in (_TqdmConsoleHandler(), logging.FileHandler(Path(output_dir) / "train.log")):
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
