"""AdamW parameter groups and the learning rate: a function of the run's progress, not of a step count.

    shares = epoch_shares(stream.step_utterances(), consumed_before)      # once per epoch (plan)
    set_learning_rates(optimizer, step_lr_factor(cfg.train, epoch=e, step=s,
                                                 share_before=shares[k], share_after=shares[k + 1]))

The progress of a run is the share of its epochs' data seen (or of `max_steps` taken, when that
bound comes first). It counts utterances, so it does not depend on how many processes share the
work: a run resumed on another world size continues the same warm-up and decay, where a schedule
in steps would jump (the number of steps left changes with the world size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from emotrain.config import ModelConfig, TrainConfig

PARTS = ("audio_encoder", "text_encoder", "head")
"""Parameters named `audio_encoder.*`, `text_encoder.*`, and everything else (the new layers)."""


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation weights (all 1-D) are not decayed; neither are 1-D embeddings' scales.
    return param.ndim <= 1 or "norm" in name.lower()


def _part(name: str) -> str:
    return next((part for part in PARTS[:2] if name.startswith(part + ".")), "head")


def learning_rates(train_cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, float]:
    """Peak lr of each part: an encoder's own lr when set, else train.lr when it is pretrained and
    train.head_lr when it is random (`tiny` learns from scratch, like the new layers)."""

    def encoder_lr(own: float | None, modality: str) -> float:
        if own is not None:
            return own
        return train_cfg.head_lr if model_cfg.is_random(modality) else train_cfg.lr

    return {
        "audio_encoder": encoder_lr(train_cfg.audio_encoder_lr, "audio"),
        "text_encoder": encoder_lr(train_cfg.text_encoder_lr, "text"),
        "head": train_cfg.head_lr,
    }


def parameter_groups(model: nn.Module, train_cfg: TrainConfig, model_cfg: ModelConfig) -> list[dict]:
    """Up to six groups: {audio_encoder, text_encoder, head} x {decay, no decay}, in that order.

    Each carries a `name` for logging (`audio_encoder`, `audio_encoder_no_decay`, ..., `head_no_decay`)
    and its part's lr (`learning_rates`) as `peak_lr`, which `set_learning_rates` scales. Frozen
    parameters are left out, and so are empty groups.
    """
    lrs = learning_rates(train_cfg, model_cfg)
    groups: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = _part(name)
        groups.setdefault(part + ("_no_decay" if _no_decay(name, param) else ""), []).append(param)
    result = []
    for part in PARTS:
        for group_name, decay in ((part, train_cfg.weight_decay), (part + "_no_decay", 0.0)):
            if group_name in groups:
                result.append({"name": group_name, "params": groups[group_name], "lr": lrs[part],
                               "peak_lr": lrs[part], "weight_decay": decay})
    return result


def lr_factor(before: float, after: float, *, warmup: float, schedule: str) -> float:
    """Multiplier of each group's peak lr for a step that takes the run from progress `before` to
    `after` (shares of the whole run, 0 to 1: see `run_progress`).

    Warm-up rises linearly to 1 over the first `warmup` of the run, reaching 1/n of it after the
    n-th of its steps (the step's end counts, so no step is taken at lr 0). Then `schedule` decays
    from 1 over the rest, by where the step starts. With steps of equal size this is the familiar
    per-step schedule; as a function of the run's progress it does not depend on how many
    processes share the run, so a resume on another world size continues the same curve.
    """
    if warmup > 0 and after <= warmup:
        return after / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, before - warmup) / max(1.0 - warmup, 1e-12))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def run_progress(*, epoch: int, epoch_share: float, step: int, max_epochs: int, max_steps: int) -> float:
    """How much of the run is done, 0 to 1: the share of its epochs' training data seen (`epoch`
    whole epochs and `epoch_share` of the current one), or of `max_steps` taken when that bound
    comes first. Training ends when it reaches 1. The data share counts utterances, so it is the
    same whatever the number of processes the run is spread over."""
    share = (epoch + epoch_share) / max_epochs
    if max_steps:
        share = max(share, step / max_steps)
    return min(share, 1.0)


def epoch_shares(step_utterances: np.ndarray, consumed_before: int = 0) -> np.ndarray:
    """[steps + 1]: the share of an epoch's utterances trained on before each step of its plan (1.0
    after the last). `step_utterances` [steps]: the plan's utterances per step over all ranks;
    `consumed_before`: utterances of the epoch trained on before this plan began (a resume on
    another number of processes re-plans the rest of the epoch)."""
    done = consumed_before + np.concatenate([[0.0], np.cumsum(step_utterances, dtype=np.float64)])
    return done / done[-1]


def stream_epoch_shares(stream) -> np.ndarray:
    """`epoch_shares` of a training stream's current epoch: its plan's step sizes, and the rows it
    trained on before the plan began (`stream.consumed`, after a resume on another world size)."""
    consumed = int(stream.consumed.sum()) if stream.consumed is not None else 0
    return epoch_shares(stream.step_utterances(), consumed)


def step_lr_factor(train_cfg: TrainConfig, *, epoch: int, step: int, share_before: float, share_after: float) -> float:
    """The lr multiplier of optimizer step `step + 1`, which takes epoch `epoch` from `share_before`
    to `share_after` of its utterances (`epoch_shares`)."""

    def at(epoch_share: float, steps: int) -> float:
        return run_progress(epoch=epoch, epoch_share=epoch_share, step=steps, max_epochs=train_cfg.max_epochs,
                            max_steps=train_cfg.max_steps)

    return lr_factor(at(share_before, step), at(share_after, step + 1), warmup=train_cfg.warmup_ratio,
                     schedule=train_cfg.lr_schedule)


def set_learning_rates(optimizer, factor: float) -> None:
    """Each parameter group's lr: its peak lr (`parameter_groups`) times `factor`."""
    for group in optimizer.param_groups:  # plain floats: the optimizer's state is loaded weights-only
        group["lr"] = float(group["peak_lr"] * factor)


def current_learning_rates(optimizer) -> dict[str, float]:
    """{part: lr} of each part that has parameter groups (`audio_encoder`, `text_encoder`, `head`):
    a part's decay and no-decay groups share one lr (`set_learning_rates`), so it is said once."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        rates.setdefault(group["name"].removesuffix("_no_decay"), float(group["lr"]))
    return rates


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, model_cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW over `parameter_groups(model, train_cfg, model_cfg)`; the recipe sets each step's lr."""
    fused = torch.cuda.is_available() if train_cfg.fused_optimizer is None else train_cfg.fused_optimizer
    return torch.optim.AdamW(parameter_groups(model, train_cfg, model_cfg), betas=(0.9, 0.98), eps=1e-8,
                             fused=fused or None)
