"""What happens at the end of an optimizer step: one small, pure decision, so each case has one order.

The recipe carries the decision out in this order, always:

    log  →  evaluate (or defer it)  →  checkpoint  →  exit for a stop request  →  finish

- Validation is due at every epoch end, every `train.eval_every_steps`, and at the last step
  (`max_steps`, or the last epoch's end). An epoch end that is also an evaluation step is
  evaluated once.
- A checkpoint follows every evaluation (so the best step always has one), every epoch end (the
  stream has moved on to the next epoch), every `train.checkpoint_every_steps`, every stop request
  and the last step.
- A stop request (preemption) checkpoints at once and exits. If validation was due at that step,
  it is deferred: the checkpoint says so (`LoopState.pending_evaluation`) and the resumed run
  validates that step first, with the same weights, so best step, early stopping, `best/` and test
  metrics are those of an uninterrupted run. (Evaluating first could outlast the grace period a
  preemption leaves; saving first cannot lose the step.)
- Early stopping is decided by the evaluation itself (`LoopState`), after which the recipe finishes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepEnd:
    """What to do after an optimizer step, in field order."""

    log: bool = False
    evaluate: bool = False
    defer_evaluation: bool = False
    """A stop request on a step whose validation was due: record it in the checkpoint instead."""
    checkpoint: bool = False
    exit_preempted: bool = False
    finish: str | None = None
    """`max_steps` or `max_epochs` when this was the last step of training."""


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def step_end(
    step: int,
    *,
    epoch_ended: bool,
    epochs_done: int,
    max_epochs: int,
    max_steps: int,
    eval_every_steps: int,
    checkpoint_every_steps: int,
    log_every_steps: int,
    stop_requested: bool,
) -> StepEnd:
    """The decision after optimizer step `step` (1-based, counting skipped steps too).

    `epoch_ended`: this step was the last of its epoch; `epochs_done` counts completed epochs
    (including this one when it ended). `max_steps == 0` means no step bound.
    """
    finish = None
    if max_steps and step >= max_steps:
        finish = "max_steps"
    elif epoch_ended and epochs_done >= max_epochs:
        finish = "max_epochs"
    evaluation_due = epoch_ended or finish is not None or _every(step, eval_every_steps)
    checkpoint = (
        evaluation_due or epoch_ended or stop_requested or finish is not None
        or _every(step, checkpoint_every_steps)
    )
    return StepEnd(
        log=_every(step, log_every_steps),
        evaluate=evaluation_due and not stop_requested,
        defer_evaluation=evaluation_due and stop_requested,
        checkpoint=checkpoint,
        exit_preempted=stop_requested,
        finish=finish,
    )
