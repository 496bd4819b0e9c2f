"""Masked statistics pooling: a variable-length sequence → its mean and standard deviation."""

from __future__ import annotations

import torch

STD_EPS = 1e-5
"""Variance floor before the square root: d sqrt(v)/dv = 1/(2 sqrt(v)) is infinite at v = 0, which
happens for a length-1 sequence or a constant feature."""


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Statistics pooling over the valid time steps of each sequence.

    x:    [B, T, D] features
    mask: [B, T] bool, True = valid step (each row needs at least one)
    returns [B, 2D]: mean over valid steps, then their standard deviation (population form, i.e.
    divided by the count, so a length-1 sequence has std sqrt(eps), not NaN).

    Computed in float32 whatever the input dtype (bf16 sums of squares lose too much precision).
    Padded steps are replaced (not multiplied) by zero, so even inf/NaN there cannot leak in.
    """
    x = x.float()
    valid = mask.unsqueeze(-1)  # [B, T, 1]
    count = valid.sum(dim=1).clamp_min(1).to(x.dtype)  # [B, 1]
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mean = x.sum(dim=1) / count  # [B, D]
    centred = torch.where(valid, x - mean.unsqueeze(1), torch.zeros((), dtype=x.dtype, device=x.device))
    variance = centred.square().sum(dim=1) / count  # [B, D]
    std = variance.clamp_min(eps).sqrt()
    return torch.cat([mean, std], dim=-1)
