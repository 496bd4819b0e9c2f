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
- EMOTRAIN_PROBE_COUNT_SYNCS=1 (with EMOTRAIN_PROBE_DIR): every rank appends one JSON line per
  optimizer step to DIR/rank<k>.syncs.jsonl: {"epoch", "step_in_epoch", "end" (the end-of-step
  decision: log, evaluate, checkpoint...), "syncs", "collectives"}, the places (file:line) where the
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


def install() -> None:
    probe_dir = os.environ.get("EMOTRAIN_PROBE_DIR")
    fault = os.environ.get("EMOTRAIN_PROBE_FAULT")
    stop_at = os.environ.get("EMOTRAIN_PROBE_STOP_AT_STEP")

    build_model = recipe.build_model

    def recording_build_model(*args, **kwargs):
        model = build_model(*args, **kwargs)
        MODELS.append(model)
        return model

    recipe.build_model = recording_build_model

    count_syncs = bool(os.environ.get("EMOTRAIN_PROBE_COUNT_SYNCS"))
    if count_syncs:
        _install_sync_counting(probe_dir)
    original_iter = TrainStream.__iter__

    def batches_of(stream):
        """The stream's batches, with the sync counting paused while the stream works."""
        iterator = original_iter(stream)
        while True:
            COUNT["in_data"] = True
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                COUNT["in_data"] = False
            yield batch

    def recording_iter(self):
        for batch in batches_of(self):
            position = self.position - 1
            if count_syncs and position % self.accumulation == 0:  # a step starts: the last one is done
                COUNT["flush"]()
                COUNT.update(active=True, step=(self.epoch, position // self.accumulation + 1))
            CURRENT.update(epoch=self.epoch, position=position, ids=list(batch["ids"]))
            COUNT["in_data"] = True  # the probe's own reads below are not the training step's
            if probe_dir:
                starts_step = position % self.accumulation == 0
                record = {"epoch": self.epoch, "position": position, "ids": list(batch["ids"]),
                          "valid": batch["valid"].tolist(), "param_sum": _param_sum() if starts_step else None}
                Path(probe_dir).mkdir(parents=True, exist_ok=True)
                with open(Path(probe_dir) / f"rank{_rank()}.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            COUNT["in_data"] = False
            yield batch

    TrainStream.__iter__ = recording_iter

    utterance_losses, micro_batch_loss = recipe.utterance_losses, recipe.micro_batch_loss
    target, epoch, kind = None, None, None
    if fault:
        target, rest = fault.split("@")
        epoch, kind = rest.split(":")

    def probed_losses(*args, **kwargs):
        weights = kwargs.get("class_weights")
        COUNT["in_data"] = True  # the probe's own read
        CURRENT.update(class_weights=None if weights is None else weights.tolist(),
                       label_smoothing=kwargs.get("label_smoothing"))
        COUNT["in_data"] = False
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

    step_end = recipe.step_end

    def probed_step_end(step, **kwargs):
        if stop_at and step == int(stop_at):
            kwargs["stop_requested"] = True
        decision = step_end(step, **kwargs)
        if count_syncs and COUNT["step"] is not None:
            COUNT["end"] = {key: value for key, value in dataclasses.asdict(decision).items() if value}
        return decision

    recipe.step_end = probed_step_end


if __name__ == "__main__":
    install()
    sys.exit(emotrain.cli.main())
