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


KILLED = 137
"""The exit status `die_in_child` gives the child that reached its fault (128 + SIGKILL)."""


def die_in_child(action, *, fault=None) -> int:
    """Run `action()` in a forked child that may die abruptly, like a killed process: no `finally`,
    no `except` cleanup. `fault(die)` is called first in the child to install the fault (e.g. patch
    `os.rename` to call `die()` on its second call); `action` may call `die` itself. Returns the
    child's exit status: KILLED when it died, 0 when `action` returned, 1 when it raised."""
    import os

    def die() -> None:
        os._exit(KILLED)

    pid = os.fork()
    if pid == 0:  # the child: never returns into the test runner
        try:
            if fault is not None:
                fault(die)
            action(die)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
