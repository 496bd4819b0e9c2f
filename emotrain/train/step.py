"""Applying (or skipping) one optimizer step's accumulated gradients, under every strategy.

A step whose gradients are not finite (a NaN/inf loss, or finite loss with NaN/inf gradients, on
any rank) must leave nothing behind: not in the weights, not in the optimizer's moments, not in the
gradients the next step accumulates into. DDP has all-reduced the gradients before the norm is
taken, so a NaN on one rank is a NaN norm on every rank; DeepSpeed computes its global norm across
ranks and skips such a step itself.

The end of a step costs one small all-reduce and one host read, whatever else it decides: the
finiteness of the norm and this rank's stop request travel in one tensor `[finite, stop]`, summed
over ranks (so every rank learns whether any rank was asked to stop, at the same step), and read
once. That read is the step's only host-device synchronisation outside logging steps; the loss
stays on the device until a log line needs it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from accelerate.utils import DistributedType


class NonFiniteStepApplied(RuntimeError):
    """DeepSpeed applied a step whose gradients were not finite (its overflow check is off)."""


class StepOutcome(NamedTuple):
    applied: bool
    """The update was made (False: skipped for non-finite gradients)."""
    stop_requested: bool
    """Some rank was asked to stop (signal or flag file): every rank gets the same answer."""


def finish_optimizer_step(accelerator, optimizer, grad_norm, *, stop_requested: bool) -> StepOutcome:
    """After the last micro-batch's backward and `clip_grad_norm_`: step the optimizer if the
    gradients are finite, clear the gradients either way, and agree on a stop
    request. Call on every rank at every optimizer step (it holds the step's one collective).

    - DeepSpeed: the engine stepped inside `accelerator.backward` at the accumulation boundary; on a
      non-finite global norm its ZeRO optimizer skipped the update and cleared its gradient
      partitions (DeepSpeed's overflow check; configs without it are refused at start, see
      `deepspeed_config.check_skips_nonfinite_steps`), which `optimizer_step_was_skipped` reports.
      `optimizer.step`/`zero_grad` are no-ops there. Should a step with a non-finite norm have been
      applied anyway, that is an error (NonFiniteStepApplied), not a silent NaN model.
    - DDP / one process: a non-finite norm skips `optimizer.step()`; with an fp16 GradScaler the
      step is still called, because the scaler itself skips it and must lower its scale.
    """
    device = accelerator.device
    if isinstance(grad_norm, torch.Tensor):
        finite = torch.isfinite(grad_norm.detach()).to(device=device, dtype=torch.float32).reshape(())
    else:  # DeepSpeed may report a float, or None without clipping
        finite = torch.tensor(float(grad_norm is None or math.isfinite(grad_norm)), device=device)
    verdict = torch.stack([finite, torch.tensor(float(stop_requested), device=device)])  # [2]
    verdict = accelerator.reduce(verdict, reduction="sum")  # the one small collective of a step
    finite_ranks, stops = verdict.tolist()  # the one host read of a step
    all_finite = finite_ranks == accelerator.num_processes
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied = not accelerator.optimizer_step_was_skipped
        if applied and not all_finite:
            raise NonFiniteStepApplied(
                f"DeepSpeed applied a step with a non-finite gradient norm ({grad_norm}): its overflow check "
                "is off in this DeepSpeed config. Use ZeRO stage 1-3 and leave bf16.check_grad_overflow on"
            )
    else:
        if all_finite or accelerator.scaler is not None:
            optimizer.step()
        applied = all_finite and not accelerator.optimizer_step_was_skipped
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(applied=applied, stop_requested=stops > 0)
