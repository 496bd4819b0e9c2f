"""Faults for tests to inject (the package has no hooks for them)."""

from __future__ import annotations

import torch


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradients are not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_gradient(x: torch.Tensor) -> torch.Tensor:
    return NanGradient.apply(x)
