"""Applying (or skipping) one optimizer step's accumulated gradients, under every strategy.

A step whose gradients are not finite (a NaN/inf loss, or finite loss with NaN/inf gradients, on
any rank) must leave nothing behind: not in the weights, not in the optimizer's moments, not in the
gradients the next step accumulates into. The verdict needs no collective of its own: DDP has
all-reduced the gradients before the norm is taken, so a NaN on one rank is a NaN norm on every
rank; DeepSpeed computes its global norm across ranks and skips such a step itself.
"""

from __future__ import annotations

import math

from accelerate.utils import DistributedType


class NonFiniteStepApplied(RuntimeError):
    """DeepSpeed applied a step whose gradients were not finite (its overflow check is off)."""


def finish_optimizer_step(accelerator, optimizer, scheduler, grad_norm) -> bool:
    """After the last micro-batch's backward and `clip_grad_norm_`: step the optimizer and the lr
    schedule if the gradients are finite, clear the gradients either way. Returns whether the step
    was applied. Call on every rank at every optimizer step.

    - DeepSpeed: the engine stepped inside `accelerator.backward` at the accumulation boundary; on a
      non-finite global norm its ZeRO optimizer skipped the update and cleared its gradient
      partitions (DeepSpeed's overflow check: on for fp16, for bf16 unless `check_grad_overflow` is
      turned off, and for fp32 ZeRO norms), which `optimizer_step_was_skipped` reports.
      `optimizer.step`/`zero_grad` are no-ops there. A config without that check (ZeRO stage 0)
      would apply such a step: that is an error (NonFiniteStepApplied), not a silent NaN model.
    - DDP / one process: a non-finite norm skips `optimizer.step()`; with an fp16 GradScaler the
      step is still called, because the scaler itself skips it and must lower its scale.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied = not accelerator.optimizer_step_was_skipped
        if applied and grad_norm is not None and not math.isfinite(float(grad_norm)):
            # ZeRO stage 0, or bf16 with "check_grad_overflow": false: nothing skipped the step.
            raise NonFiniteStepApplied(
                f"DeepSpeed applied a step with a non-finite gradient norm ({grad_norm}): its overflow check "
                "is off in this DeepSpeed config. Use ZeRO stage 1-3 and leave bf16.check_grad_overflow on"
            )
    else:
        finite = math.isfinite(float(grad_norm))  # the one host-device sync of a step
        if finite or accelerator.scaler is not None:
            optimizer.step()
        applied = finite and not accelerator.optimizer_step_was_skipped
    if applied:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return applied

