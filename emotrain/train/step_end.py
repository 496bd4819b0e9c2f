"""What happens at the end of an optimizer step: small, pure decisions, so each case has one order.

The recipe carries them out in this order, always:

    log  →  validate  →  step_end: (defer validation) → checkpoint → exit for a stop request → finish

- Logging is due every `logging.log_every_steps`.
- Validation is due at every epoch end, every `train.eval_every_steps`, and at the last step
  (`max_steps`, or the last epoch's end). An epoch end that is also an evaluation step is
  evaluated once. A stop request defers it (below).
- `step_end` owns every reason to stop: `max_steps`, `max_epochs`, early stopping (the validation
  just counted is the patience-th without improvement), too many non-finite steps in a row (an
  abort: the run fails with a message), and a stop request (preemption).
- A checkpoint follows every validation (so the best step always has one), every epoch end (the
  stream has moved on to the next epoch), every `train.checkpoint_every_steps`, every stop request
  and the last step.
- A stop request checkpoints at once and exits. If validation was due at that step, it is deferred:
  the checkpoint says so (`Progress.pending_evaluation`) and the resumed run validates that step
  first, with the same weights, so best step, early stopping, `best/` and test metrics are those of
  an uninterrupted run. (Validating first could outlast the grace period a preemption leaves;
  saving first cannot lose the step.)
"""

from __future__ import annotations

from dataclasses import dataclass

from emotrain.config import Config


@dataclass(frozen=True)
class StepRule:
    """The cadences and limits a run's steps are decided by (from the config)."""

    max_epochs: int
    max_steps: int = 0
    """0: no step bound."""
    eval_every_steps: int = 0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 1
    early_stopping_patience: int = 0
    """0: no early stopping."""
    max_consecutive_nonfinite: int = 0
    """0: no limit."""

    @classmethod
    def from_config(cls, cfg: Config) -> "StepRule":
        train = cfg.train
        return cls(max_epochs=train.max_epochs, max_steps=train.max_steps, eval_every_steps=train.eval_every_steps,
                   checkpoint_every_steps=train.checkpoint_every_steps, log_every_steps=cfg.logging.log_every_steps,
                   early_stopping_patience=train.early_stopping_patience,
                   max_consecutive_nonfinite=train.max_consecutive_nonfinite)

    def log_due(self, facts: StepFacts) -> bool:
        return _every(facts.step, self.log_every_steps)

    def evaluation_due(self, facts: StepFacts) -> bool:
        """Whether this step's validation is due (the recipe runs it unless a stop was requested:
        `step_end` then defers it)."""
        return facts.epoch_ended or self._limit_reached(facts) is not None or _every(facts.step, self.eval_every_steps)

    def step_end(self, facts: StepFacts) -> StepEnd:
        """The decision after step `facts.step` and its validation, if it had one."""
        if self.max_consecutive_nonfinite and facts.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            return StepEnd(abort=(
                f"{facts.consecutive_nonfinite} steps in a row with non-finite gradients at step {facts.step}: "
                "lower train.lr / head_lr, use bf16 instead of fp16, or check the data"))
        defer = self.evaluation_due(facts) and facts.stop_requested and not facts.validated
        finish = self._limit_reached(facts)
        if (finish is None and facts.validated and self.early_stopping_patience
                and facts.evaluations_without_improvement >= self.early_stopping_patience):
            finish = "early_stopping"
        checkpoint = (facts.validated or defer or facts.epoch_ended or facts.stop_requested or finish is not None
                      or _every(facts.step, self.checkpoint_every_steps))
        return StepEnd(defer_evaluation=defer, checkpoint=checkpoint, exit_preempted=facts.stop_requested,
                       finish=finish)

    def _limit_reached(self, facts: StepFacts) -> str | None:
        if self.max_steps and facts.step >= self.max_steps:
            return "max_steps"
        if facts.epoch_ended and facts.epochs_done >= self.max_epochs:
            return "max_epochs"
        return None


@dataclass(frozen=True)
class StepFacts:
    """What the loop knows after optimizer step `step` (1-based, counting skipped steps too)."""

    step: int
    epoch_ended: bool = False
    """This step was the last of its epoch."""
    epochs_done: int = 0
    """Completed epochs, this one included when it ended."""
    stop_requested: bool = False
    """Some rank was asked to stop (agreed on by every rank)."""
    consecutive_nonfinite: int = 0
    validated: bool = False
    """This step was validated (just now, or on resume when a stop request had deferred it)."""
    evaluations_without_improvement: int = 0
    """Counted up to this step's validation, if it had one."""


@dataclass(frozen=True)
class StepEnd:
    """What to do after the step's validation, in field order."""

    defer_evaluation: bool = False
    """A stop request on a step whose validation was due: record it in the checkpoint instead."""
    checkpoint: bool = False
    exit_preempted: bool = False
    finish: str | None = None
    """Why training ends here: `max_steps`, `max_epochs` or `early_stopping`."""
    abort: str | None = None
    """Why the run fails here (too many non-finite steps in a row): no checkpoint, no result."""


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0
