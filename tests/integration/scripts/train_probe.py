"""`emotrain` with probes for tests: record what each rank trains on, inject faults, stop at a step.

    python tests/integration/scripts/train_probe.py train configs/smoke.yaml ...          (or under accelerate launch)

Without any EMOTRAIN_PROBE_* variable it is exactly `python -m emotrain.cli`. The probes patch the
recipe's own names (nothing in the package knows about them):

- EMOTRAIN_PROBE_DIR=DIR: every rank appends one JSON line per training batch it yields to
  DIR/rank<k>.jsonl: {"epoch", "position", "ids", "valid", "param_sum"}; param_sum is the float64 sum
  of the rank's local parameters when the batch starts an optimizer step (null otherwise, and under
  ZeRO-3 where a rank holds a partition only). And one line per micro-batch loss to
  DIR/rank<k>.loss.jsonl: {"epoch", "position", "step_utterances", "class_weights",
  "label_smoothing"}, what the recipe passed to its loss functions.
- EMOTRAIN_PROBE_FAULT=ID@EPOCH:KIND: on the batch holding utterance ID in EPOCH (one rank only,
  whichever holds it), KIND `loss` makes the batch's loss NaN; `grad` keeps the loss finite but makes
  its gradients NaN.
- EMOTRAIN_PROBE_STOP_AT_STEP=N: a stop request arrives at step N, on every rank, exactly as an agreed
  preemption would (the end-of-step decision sees stop_requested=True).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository: `tests.faults`

import emotrain.cli  # noqa: E402
from emotrain.data.stream import TrainStream  # noqa: E402
from emotrain.train import recipe  # noqa: E402
from tests.faults import nan_gradient  # noqa: E402

CURRENT: dict = {}
MODELS: list = []


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _param_sum() -> float | None:
    if not MODELS:
        return None
    params = [p for p in MODELS[0].parameters()]
    if any(p.numel() == 0 for p in params):  # ZeRO-3 partitions: no whole view on one rank
        return None
    return float(sum(p.detach().double().sum() for p in params))


def install() -> None:
    probe_dir = os.environ.get("EMOTRAIN_PROBE_DIR")
    fault = os.environ.get("EMOTRAIN_PROBE_FAULT")
    stop_at = os.environ.get("EMOTRAIN_PROBE_STOP_AT_STEP")

    build_model = recipe.build_model

    def recording_build_model(cfg):
        model = build_model(cfg)
        MODELS.append(model)
        return model

    recipe.build_model = recording_build_model

    original_iter = TrainStream.__iter__

    def recording_iter(self):
        for batch in original_iter(self):
            position = self.position - 1
            CURRENT.update(epoch=self.epoch, position=position, ids=list(batch["ids"]))
            if probe_dir:
                starts_step = position % self.accumulation == 0
                record = {"epoch": self.epoch, "position": position, "ids": list(batch["ids"]),
                          "valid": batch["valid"].tolist(), "param_sum": _param_sum() if starts_step else None}
                Path(probe_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(probe_dir) / f"rank{_rank()}.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            yield batch

    TrainStream.__iter__ = recording_iter

    utterance_losses, micro_batch_loss = recipe.utterance_losses, recipe.micro_batch_loss
    target, epoch, kind = None, None, None
    if fault:
        target, rest = fault.split("@")
        epoch, kind = rest.split(":")

    def probed_losses(*args, **kwargs):
        weights = kwargs.get("class_weights")
        CURRENT.update(class_weights=None if weights is None else weights.tolist(),
                       label_smoothing=kwargs.get("label_smoothing"))
        losses = utterance_losses(*args, **kwargs)
        if fault and CURRENT.get("epoch") == int(epoch) and target in CURRENT.get("ids", ()):
            print(f"probe: {kind} fault on rank {_rank()} (batch with {target})", file=sys.stderr, flush=True)
            if kind == "loss":
                return losses * float("nan")
            return losses + 0 * nan_gradient(losses)  # finite loss, NaN gradients
        return losses

    def probed_micro_batch_loss(losses, step_utterances, **kwargs):
        if probe_dir:
            record = {key: CURRENT.get(key) for key in ("epoch", "position", "class_weights", "label_smoothing")}
            with open(Path(probe_dir) / f"rank{_rank()}.loss.jsonl", "a") as handle:
                handle.write(json.dumps({**record, "step_utterances": step_utterances}) + "\n")
        return micro_batch_loss(losses, step_utterances, **kwargs)

    recipe.utterance_losses, recipe.micro_batch_loss = probed_losses, probed_micro_batch_loss

    if stop_at:
        step_end = recipe.step_end

        def stopping_step_end(step, **kwargs):
            if step == int(stop_at):
                kwargs["stop_requested"] = True
            return step_end(step, **kwargs)

        recipe.step_end = stopping_step_end


if __name__ == "__main__":
    install()
    sys.exit(emotrain.cli.main())
