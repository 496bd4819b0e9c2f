"""`emotrain` with probes for tests: record what each rank trains on, inject faults, stop at a step.

    python tests/integration/scripts/train_probe.py train configs/smoke.yaml ...          (or under accelerate launch)

Without any EMOTRAIN_PROBE_* variable it is exactly `python -m emotrain.cli`. The probes wrap the
run's own parts after `emotrain.train.recipe.setup` (through `train`'s `wrap`): the data stream,
the loss and the step rule of the `Training` it built; nothing in the package is patched.

- EMOTRAIN_PROBE_DIR=DIR: every rank appends one JSON line per training batch it yields to
  DIR/rank<k>.jsonl: {"epoch", "position", "ids", "valid", "param_sum"}; param_sum is the float64 sum
  of the rank's local parameters when the batch starts an optimizer step (null otherwise, and under
  ZeRO-3 where a rank holds a partition only). And one line per micro-batch loss to
  DIR/rank<k>.loss.jsonl: {"epoch", "position", "step_utterances", "class_weights",
  "label_smoothing"}, what the recipe's loss was called with.
- EMOTRAIN_PROBE_FAULT=ID@EPOCH:KIND: on the batch holding utterance ID in EPOCH (one rank only,
  whichever holds it), KIND `loss` makes the batch's loss NaN; `grad` keeps the loss finite but makes
  its gradients NaN.
- EMOTRAIN_PROBE_STOP_AT_STEP=N: a stop request arrives during step N on every rank, through the
  run's own preemption watcher, exactly as a signal would (the step ends with stop_requested=True).
- EMOTRAIN_PROBE_COUNT_SYNCS=1 (with EMOTRAIN_PROBE_DIR): every rank appends one JSON line per
  optimizer step to DIR/rank<k>.syncs.jsonl: {"epoch", "step_in_epoch", "end" (what the step rule
  decided: log, evaluate, checkpoint...), "syncs", "collectives"}, the places (file:line) where the
  training step read a tensor on the host (`item`, `bool`, `float`, `int`, `tolist`, `numpy`, `cpu`,
  and kernels that must wait for the device: nonzero, masked_select, boolean indexing) and where it
  called a torch.distributed collective (DDP's gradient buckets run in C++ and are not counted).
  Not counted: the data stream (it runs before the batch exists; with workers, in other processes)
  and torch.optim's own reads of its step counters (host tensors unless `capturable`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository: `tests.faults`

import emotrain.cli  # noqa: E402
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


COUNT: dict = {"active": False, "in_data": False, "syncs": [], "collectives": [], "end": None, "step": None}
TENSOR_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "barrier", "all_gather_object", "broadcast_object_list", "gather_object",
               "scatter_object_list", "all_to_all")


def _where() -> str | None:
    """file:line of the innermost caller outside torch (None: a read torch.optim makes of its own
    host-side step counters, by design not a device sync)."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/optim/" in path:
            return None
        if "/site-packages/torch/" in path or path.endswith("train_probe.py"):
            continue
        return f"{path.split('/site-packages/')[-1].split('/emotrain/')[-1]}:{frame.lineno}"
    return "?"


def _counting(kind: str, name: str, original):
    def wrapper(*args, **kwargs):
        if COUNT["active"] and not COUNT["in_data"]:
            where = _where()
            if where is not None:
                COUNT[kind].append(f"{name} at {where}")
        return original(*args, **kwargs)

    wrapper.__name__ = getattr(original, "__name__", name)
    return wrapper


def _install_sync_counting(probe_dir: str) -> None:
    import atexit

    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    for name in TENSOR_READS:
        setattr(torch.Tensor, name, _counting("syncs", name, getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _counting("collectives", name, getattr(dist, name)))

    waiting_ops = {"aten::nonzero", "aten::masked_select", "aten::nonzero_static", "aten::unique_consecutive",
                   "aten::_unique2"}

    class DeviceWaits(TorchDispatchMode):
        """Kernels whose output size depends on the data: on a GPU they wait for the device."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            boolean_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
            if (name in waiting_ops or boolean_index) and COUNT["active"] and not COUNT["in_data"]:
                where = _where()
                if where is not None:
                    COUNT["syncs"].append(f"{name} at {where}")
            return func(*args, **(kwargs or {}))

    DeviceWaits().__enter__()  # for the whole run (the counts only matter while COUNT is active)

    def flush() -> None:
        if COUNT["step"] is not None:
            epoch, step_in_epoch = COUNT["step"]
            with open(Path(probe_dir) / f"rank{_rank()}.syncs.jsonl", "a") as handle:
                handle.write(json.dumps({"epoch": epoch, "step_in_epoch": step_in_epoch, "end": COUNT["end"],
                                         "syncs": COUNT["syncs"], "collectives": COUNT["collectives"]}) + "\n")
        COUNT.update(syncs=[], collectives=[], end=None, step=None)

    COUNT["flush"] = flush
    atexit.register(lambda: (COUNT.update(active=False), flush()))


class RecordingStream:
    """The run's training stream, recording each batch it yields (and requesting the probe's stop)."""

    def __init__(self, stream, training, probe_dir: str | None, stop_at: int | None, count_syncs: bool):
        self._stream, self._training = stream, training
        self._probe_dir, self._stop_at, self._count_syncs = probe_dir, stop_at, count_syncs

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _batches(self):
        """The stream's batches, with the sync counting paused while the stream works."""
        iterator = iter(self._stream)
        while True:
            COUNT["in_data"] = True
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                COUNT["in_data"] = False
            yield batch

    def __iter__(self):
        stream, accumulation = self._stream, self._stream.accumulation
        for batch in self._batches():
            position = stream.position - 1
            starts_step = position % accumulation == 0
            step = self._training.state.progress.step + 1  # the step this batch belongs to
            if self._count_syncs and starts_step:  # a step starts: the last one is done
                COUNT["flush"]()
                COUNT.update(active=True, step=(stream.epoch, position // accumulation + 1))
            if self._stop_at is not None and starts_step and step == self._stop_at:
                self._training.watcher.request(f"probe: stop at step {step}")
            CURRENT.update(epoch=stream.epoch, position=position, ids=list(batch["ids"]))
            COUNT["in_data"] = True  # the probe's own reads below are not the training step's
            if self._probe_dir:
                record = {"epoch": stream.epoch, "position": position, "ids": list(batch["ids"]),
                          "valid": batch["valid"].tolist(), "param_sum": _param_sum() if starts_step else None}
                Path(self._probe_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(self._probe_dir) / f"rank{_rank()}.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            COUNT["in_data"] = False
            yield batch


class ProbedLoss:
    """The run's loss, recording what it is called with and injecting the probe's fault."""

    def __init__(self, loss, probe_dir: str | None, fault: str | None):
        self._loss, self._probe_dir = loss, probe_dir
        self._target = self._epoch = self._kind = None
        if fault:
            self._target, rest = fault.split("@")
            epoch, self._kind = rest.split(":")
            self._epoch = int(epoch)

    def __call__(self, logits, batch, step_utterances):
        weights = self._loss.class_weights
        COUNT["in_data"] = True  # the probe's own reads
        record = {"epoch": CURRENT.get("epoch"), "position": CURRENT.get("position"),
                  "class_weights": None if weights is None else weights.tolist(),
                  "label_smoothing": self._loss.label_smoothing, "step_utterances": step_utterances}
        COUNT["in_data"] = False
        if self._probe_dir:
            with open(Path(self._probe_dir) / f"rank{_rank()}.loss.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        scaled, losses = self._loss(logits, batch, step_utterances)
        if self._target is not None and CURRENT.get("epoch") == self._epoch and self._target in CURRENT.get("ids", ()):
            print(f"probe: {self._kind} fault on rank {_rank()} (batch with {self._target})", file=sys.stderr, flush=True)
            if self._kind == "loss":
                return scaled * float("nan"), losses * float("nan")
            return scaled + 0 * nan_gradient(scaled), losses  # finite loss, NaN gradients
        return scaled, losses

    def per_utterance(self, logits, batch):
        return self._loss.per_utterance(logits, batch)  # validation's loss: neither recorded nor faulted


class RecordingRule:
    """The run's step rule, recording what it decided for the step (the sync counts' "end")."""

    def __init__(self, rule):
        self._rule = rule

    def __getattr__(self, name):
        return getattr(self._rule, name)

    def _note(self, **decided) -> None:
        if COUNT["step"] is not None:
            COUNT["end"] = {**(COUNT["end"] or {}), **{key: value for key, value in decided.items() if value}}

    def log_due(self, facts):
        due = self._rule.log_due(facts)
        self._note(log=due)
        return due

    def evaluation_due(self, facts):
        due = self._rule.evaluation_due(facts)
        self._note(evaluate=due and not facts.stop_requested)
        return due

    def step_end(self, facts):
        end = self._rule.step_end(facts)
        self._note(**dataclasses.asdict(end))
        return end


def wrap(training) -> None:
    """Put the probes around the run's parts, as the environment asks."""
    probe_dir = os.environ.get("EMOTRAIN_PROBE_DIR")
    stop_at = os.environ.get("EMOTRAIN_PROBE_STOP_AT_STEP")
    count_syncs = bool(os.environ.get("EMOTRAIN_PROBE_COUNT_SYNCS"))
    MODELS.append(training.state.model)
    if count_syncs:
        _install_sync_counting(probe_dir)
        training.rule = RecordingRule(training.rule)
    training.state.stream = RecordingStream(training.state.stream, training, probe_dir,
                                            int(stop_at) if stop_at else None, count_syncs)
    training.loss = ProbedLoss(training.loss, probe_dir, os.environ.get("EMOTRAIN_PROBE_FAULT"))


if __name__ == "__main__":
    sys.exit(emotrain.cli.main(wrap_training=wrap))
