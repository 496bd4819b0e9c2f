"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

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
    and its part's lr (`learning_rates`). Frozen parameters are left out, and so are empty groups.
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
                result.append(
                    {"name": group_name, "params": groups[group_name], "lr": lrs[part], "weight_decay": decay}
                )
    return result


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_optimizer_and_scheduler(
    model: nn.Module, train_cfg: TrainConfig, model_cfg: ModelConfig, total_steps: int
):
    """AdamW over `parameter_groups(model, train_cfg, model_cfg)` and its warmup-then-decay schedule."""
    fused = torch.cuda.is_available() if train_cfg.fused_optimizer is None else train_cfg.fused_optimizer
    optimizer = torch.optim.AdamW(parameter_groups(model, train_cfg, model_cfg), betas=(0.9, 0.98), eps=1e-8,
                                  fused=fused or None)
    warmup = int(train_cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, train_cfg.lr_schedule)
    )
    return optimizer, scheduler
