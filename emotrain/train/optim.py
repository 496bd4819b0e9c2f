"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from emotrain.config import TrainConfig

ENCODER_PREFIXES = ("audio_encoder.", "text_encoder.")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation weights (all 1-D) are not decayed; neither are 1-D embeddings' scales.
    return param.ndim <= 1 or "norm" in name.lower()


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four groups: {encoder, head} x {decay, no decay}; frozen parameters are left out.

    Encoders (names starting `audio_encoder.` / `text_encoder.`) get `cfg.lr`, the new layers
    (projections, cross-attention, classifier) `cfg.head_lr`. Each group carries a `name` for logging.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "encoder" if name.startswith(ENCODER_PREFIXES) else "head"
        groups.setdefault((part, _no_decay(name, param)), []).append(param)
    result = []
    for (part, no_decay), params in sorted(groups.items()):
        result.append(
            {
                "name": f"{part}{'_no_decay' if no_decay else ''}",
                "params": params,
                "lr": cfg.lr if part == "encoder" else cfg.head_lr,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            }
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


def build_optimizer_and_scheduler(model: nn.Module, cfg: TrainConfig, total_steps: int):
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), betas=(0.9, 0.98), eps=1e-8)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.lr_schedule)
    )
    return optimizer, scheduler
