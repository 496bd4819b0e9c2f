"""The training state: everything a checkpoint saves, saved and restored whole.

    state = TrainingState(model, optimizer, stream, Progress(run_id=...), LogWindow(device))
    state.save(accelerator, checkpoints_dir, config_yaml=..., keep_last=2)   # every rank
    state.restore(accelerator, folder)                                      # every rank, one call

- `Progress`: where the loop stands (epoch, step, best validation, early-stopping and non-finite
  counts, why it stopped, the tracker run id), written as `loop_state.json` with the writer's world
  size and strategy;
- the data stream's position on every rank (`stream-rank<r>.json`);
- the model, optimizer, scaler and every rank's RNG (Accelerate's `save_state`);
- `LogWindow`: the training figures summed since the last log line, over all ranks, so a resumed
  run logs at its next log step what an uninterrupted one would have.

The learning rate is not state: it is a function of the run's progress (`emotrain.train.optim`).
The folders themselves (atomic publication, crash recovery, rotation, what `resume=auto` picks, the
manifest that finds damage) are the torch-free store in `emotrain.train.checkpoint`.

Loading is strict: Accelerate's `load_state` catches any failure to load a rank's RNG state file
(`random_states_<r>.pkl`: truncated, garbage, or a pickle `weights_only` refuses) and only logs it,
so a resume would silently diverge. `load_checkpoint` loads that file first and fails loudly, and
turns any other load failure into a one-line `ResumeError`; `rng_state_problem` checks every rank's
file before a checkpoint is chosen, so `resume=auto` can fall back from it.

A save that runs out of disk space is reported as `OSError(ENOSPC)` saying how much a checkpoint
needs: when the error says the disk is full, or when it is torch's writer failing without a reason
(`unexpected pos ...`, what it says on a full disk) and too little space is free. Any other error
goes on unchanged. The save is a collective: a rank that fails
leaves the others waiting in the next barrier until the launcher (torchrun, `accelerate launch`)
ends them on that rank's exit; no collective is added after a failure. The same holds for a rank
whose load fails alone, which is rare: the main process has checked every rank's files before.
"""

from __future__ import annotations

import dataclasses
import errno
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError

from emotrain.train.checkpoint import (
    LOOP_STATE,
    ResumeError,
    checkpoint_name,
    finalize,
    latest_checkpoint,
    partial_dir,
    read_json,
    rotate,
    stream_state_path,
    write_json,
)

_STREAM_NAME = re.compile(r"^stream-rank(\d+)\.json$")


@dataclass
class Progress:
    """Where the training loop stands; saved as JSON in every checkpoint."""

    epoch: int = 0
    """The epoch the data stream is in (the next one after an epoch-end checkpoint)."""
    step: int = 0
    """Optimizer steps taken (skipped ones too: a step is a position in the data)."""
    best_ua: float = -1.0
    best_step: int | None = None
    best_validation: dict | None = None
    """The full validation metrics at best_step."""
    evaluations_without_improvement: int = 0
    consecutive_nonfinite: int = 0
    nonfinite_steps: int = 0
    """Optimizer steps skipped because a loss was NaN/inf (on any rank)."""
    stop_reason: str | None = None
    """Why training ended (max_epochs, max_steps, early_stopping); None while it goes on."""
    run_id: str = ""
    """The tracker run id (W&B), so a resumed run continues the same run."""
    pending_evaluation: bool = False
    """A stop request arrived on a step whose validation was due: the checkpoint was taken before
    validating; the resumed run validates this step first."""
    last_evaluation_step: int | None = None
    """The step validated last (a step is validated once, whatever leads there twice)."""
    last_log_step: int | None = None
    """The step whose training figures were logged last (logged once, like validation)."""
    log_window: dict | None = None
    """Training sums since the last log line, over all ranks (`LogWindow.KEYS`)."""
    world_size: int = 1
    """Processes that wrote the checkpoint (`TrainingState.save` records it)."""
    distributed_type: str = "NO"
    """Accelerate's distributed type name that wrote the checkpoint, e.g. "MULTI_GPU", "DEEPSPEED"."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage that wrote the checkpoint; 0 without DeepSpeed."""

    def record_validation(self, ua: float, metrics: dict) -> bool:
        """Count a validation of this step; True if it is the best so far (it then becomes best_step)."""
        improved = ua > self.best_ua
        if improved:
            self.best_ua, self.best_step, self.best_validation = ua, self.step, metrics
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        self.pending_evaluation, self.last_evaluation_step = False, self.step
        return improved

    def record_step(self, applied: bool) -> None:
        """Count an optimizer step, applied or skipped for non-finite gradients."""
        self.step += 1
        self.consecutive_nonfinite = 0 if applied else self.consecutive_nonfinite + 1
        self.nonfinite_steps += not applied

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Progress":
        """Fields missing from `data` (a checkpoint written before they existed) get their defaults;
        an unknown field is an error rather than something silently dropped."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"loop state has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)


class LogWindow:
    """The training figures summed since the last log line on this rank, and the time they took
    (evaluating and saving paused). The loss stays on the device until a log line needs it: no
    host read per step."""

    KEYS = ("loss", "valid", "utterances", "audio_seconds", "padded_seconds", "data_seconds", "steps")

    def __init__(self, device: torch.device):
        self.device = device
        self.sums = dict.fromkeys(self.KEYS[1:], 0.0)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm: torch.Tensor | float | None = None
        """The gradient norm of the last step (logged, not summed)."""
        self.restart_clock()

    def add_batch(self, batch: dict, waited_seconds: float) -> None:
        self.sums["utterances"] += len(batch["ids"])
        self.sums["audio_seconds"] += batch["audio_seconds"]
        self.sums["padded_seconds"] += batch["padded_audio_seconds"]
        self.sums["data_seconds"] += waited_seconds

    def add_step(self, loss: torch.Tensor | None, valid: int) -> None:
        """A step taken; `loss` (summed over its utterances, on the device) only when it was applied."""
        self.sums["steps"] += 1
        if loss is not None:
            self.loss += loss
            self.sums["valid"] += valid

    def restart_clock(self) -> None:
        self.started, self.paused = time.perf_counter(), 0.0

    def pause(self) -> "_Pause":
        """`with window.pause():` time spent inside is not training time."""
        return _Pause(self)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started - self.paused, 1e-9)

    def totals(self, accelerator) -> dict[str, float]:
        """Every key summed over ranks, in float64 (a collective: every rank calls it)."""
        values = torch.tensor([float(self.loss)] + [self.sums[key] for key in self.KEYS[1:]],
                              dtype=torch.float64, device=accelerator.device)
        return dict(zip(self.KEYS, accelerator.reduce(values, reduction="sum").tolist()))

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.KEYS[1:], 0.0)
        self.loss.zero_()
        self.restart_clock()

    def restore(self, saved: dict | None, is_main_process: bool) -> None:
        """Continue from the sums over ranks a checkpoint holds: rank 0 holds them all, the others none."""
        self.reset()
        if saved and is_main_process:
            self.sums.update({key: saved[key] for key in self.KEYS[1:] if key in saved})
            self.loss += saved.get("loss", 0.0)


class _Pause:
    def __init__(self, window: LogWindow):
        self.window = window

    def __enter__(self) -> None:
        self.began = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.window.paused += time.perf_counter() - self.began


@dataclass
class TrainingState:
    """What a checkpoint saves and `restore` brings back (see the module docstring)."""

    model: Any
    optimizer: Any
    stream: Any
    """The rank's `emotrain.data.stream.TrainStream`."""
    progress: Progress
    window: LogWindow

    def save(self, accelerator, checkpoints_dir: str | Path, *, config_yaml: str, keep_last: int) -> Path:
        """Save the whole state into `checkpoints_dir/step-NNNNNN` atomically, then rotate. A
        collective: every rank calls it at the same step (DeepSpeed's `save_state` is one)."""
        self.progress.log_window = self.window.totals(accelerator)
        step = self.progress.step
        partial = partial_dir(checkpoints_dir, step)
        if accelerator.is_main_process:
            with self._disk_full_reported(checkpoints_dir, step):
                shutil.rmtree(partial, ignore_errors=True)  # debris of a save that was killed
                partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with self._disk_full_reported(checkpoints_dir, step):  # (a partial folder left is the next save's debris)
            accelerator.save_state(str(partial))  # DeepSpeed: every rank writes its partition
            write_json(stream_state_path(partial, accelerator.process_index), self.stream.state_dict())
        accelerator.wait_for_everyone()
        final = Path(checkpoints_dir) / checkpoint_name(step)
        if accelerator.is_main_process:
            saved = dataclasses.replace(self.progress, **_writer_fields(accelerator))
            with self._disk_full_reported(checkpoints_dir, step):
                final = finalize(checkpoints_dir, step, saved.to_dict(), config_yaml)
            best = {self.progress.best_step} if self.progress.best_step is not None else set()
            rotate(checkpoints_dir, keep_last, keep_steps=best)
        accelerator.wait_for_everyone()
        return final

    def restore(self, accelerator, folder: str | Path) -> None:
        """Continue from checkpoint `folder`: the loop's progress, every rank's data position (re-planned
        on another number of processes), the weights, optimizer, scaler and RNG, and the log window.
        Whatever cannot be continued here is refused (ResumeError) before the slow load."""
        folder = Path(folder)
        try:
            progress = read_progress(folder)
            check_resumable(progress, _writer_fields(accelerator))
            self.stream.load_state_dicts(read_stream_states(folder, progress.world_size))
        except (OSError, ValueError) as err:  # a file missing or damaged, or the data or settings changed
            raise ResumeError(f"cannot resume from {folder}: {err}") from None
        peaks = [group["peak_lr"] for group in self.optimizer.param_groups]  # this run's, from the config
        load_checkpoint(accelerator, folder)
        for group, peak in zip(self.optimizer.param_groups, peaks):  # a checkpoint written before peak_lr existed
            group["peak_lr"] = peak
        self.progress = progress
        self.window.restore(progress.log_window, accelerator.is_main_process)


    @contextmanager
    def _disk_full_reported(self, checkpoints_dir: str | Path, step: int) -> Iterator[None]:
        """A write of checkpoint `step` that failed because the disk is full raises `OSError(ENOSPC)`
        saying so (see `_disk_full_error`); any other failure goes on as it was."""
        try:
            yield
        except Exception as err:
            report = _disk_full_error(err, Path(checkpoints_dir), step, self.model, self.optimizer)
            if report is None:
                raise
            raise report from err


_MiB = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_WORDS = ("No space left", "Disk quota exceeded", "StorageFull", "os error 28")
_GENERIC_WRITE_FAILURE = ("unexpected pos", "file write failed", "PytorchStreamWriter")
"""What torch's checkpoint writer says when a write fails, whatever the cause (a full disk among others)."""


def _disk_full_error(err: Exception, checkpoints_dir: Path, step: int, model, optimizer) -> OSError | None:
    """`OSError(ENOSPC, <what happened, what a checkpoint needs, what to do>, checkpoints_dir)` when the
    disk is why writing checkpoint `step` failed: the error says so (ENOSPC or EDQUOT anywhere in its
    cause chain, or the words), or it is torch's writer failing without saying why (`unexpected pos
    ...`, `file write failed`) and what is free there cannot hold the rest of a checkpoint. None
    otherwise: any other error is not guessed to be the disk, however little space is free."""
    says_full = _says_disk_full(err)
    if not (says_full or _mentions(err, _GENERIC_WRITE_FAILURE)):
        return None
    try:
        needed = _checkpoint_bytes(checkpoints_dir, model, optimizer)
        written = _folder_bytes(partial_dir(checkpoints_dir, step))
        free = shutil.disk_usage(checkpoints_dir).free
    except OSError:  # the folder itself is gone or unreadable: not a question of space
        return None
    if not (says_full or free < max(needed - written, _MiB)):
        return None
    return OSError(errno.ENOSPC, (
        f"no space left on device while saving checkpoint {checkpoint_name(step)} "
        f"({err.__class__.__name__}: {_first_line(err)}); it needs about {_megabytes(needed)}, "
        f"{_megabytes(free)} free there; free space and rerun: the run resumes from its last complete checkpoint"),
        str(checkpoints_dir))


def _megabytes(size: int) -> str:
    return f"{size / _MiB:.0f} MB" if size >= 10 * _MiB else f"{size / _MiB:.1f} MB"


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and every error it was raised from or while handling."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _says_disk_full(err: BaseException) -> bool:
    """Whether `err` or an error it was raised from is the disk (or quota) being full."""
    return any(isinstance(cause, OSError) and cause.errno in _DISK_FULL for cause in _causes(err)) or _mentions(
        err, _DISK_FULL_WORDS)  # (the words: safetensors' and torch's errors that wrap the OS one in text)


def _mentions(err: BaseException, words: tuple[str, ...]) -> bool:
    return any(word in str(cause) for cause in _causes(err) for word in words)


def _folder_bytes(folder: Path) -> int:
    try:
        return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    except OSError:
        return 0


def _checkpoint_bytes(checkpoints_dir: str | Path, model, optimizer) -> int:
    """About what a checkpoint takes: the last one written, or else the model and optimizer tensors."""
    previous = latest_checkpoint(checkpoints_dir)
    if previous is not None and (size := _folder_bytes(previous)):
        return size
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _first_line(err: BaseException) -> str:
    """A load or write error in one short line (torch's weights_only refusal is a paragraph)."""
    text = str(err)
    if match := re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S):
        text = match.group(1)
    text = " ".join(text.split()) or "no message"
    return text if len(text) <= 200 else text[:197] + "..."


_RNG_STATE = "random_states_{rank}.pkl"
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)
"""What loading a damaged file raises (a missing or unreadable file, torch's and safetensors' parsers)."""


def _rng_file_problem(folder: Path, rank: int) -> str | None:
    """Why rank `rank`'s RNG state in `folder` does not load as plain data (weights_only), or None."""
    path = folder / _RNG_STATE.format(rank=rank)
    if not path.is_file():
        return f"{path.name}: {'a directory in place of the file' if path.is_dir() else 'missing'}"
    try:
        states = accelerate_load(path)  # what load_state does, weights_only included, but not swallowed
    except _LOAD_ERRORS as err:
        return f"{path.name} does not load ({err.__class__.__name__}: {_first_line(err)})"
    if not isinstance(states, dict) or "random_state" not in states:
        return f"{path.name} holds no random states"
    return None


def rng_state_problem(folder: Path) -> str | None:
    """Why the RNG state of some rank that wrote checkpoint `folder` does not load, as the end of
    "checkpoint step-N ...", or None (`emotrain.train.checkpoint.resolve_resume`'s `check_loads`).
    These files are small; the other files Accelerate loads fail loudly on their own."""
    try:
        world_size = read_progress(folder).world_size
    except (OSError, ValueError):
        return None  # `TrainingState.restore` refuses the folder, naming its loop state
    problems = [problem for rank in range(world_size) if (problem := _rng_file_problem(folder, rank))]
    return f"is damaged ({problems[0]})" if problems else None


def load_checkpoint(accelerator, folder: str | Path) -> None:
    """`accelerator.load_state(folder)`, strictly: this rank's RNG state must load (Accelerate would
    log its failure and go on, diverging), and any failure to load a file is a one-line
    `ResumeError` naming the folder rather than a library traceback. (A rank the writer did not have,
    a DDP run resumed on more processes, has no RNG state there: it keeps the one `set_seed` gave it.)"""
    folder = Path(folder)
    try:
        writers = read_progress(folder).world_size
    except (OSError, ValueError):  # (`restore` reads it first; unreadable here, every rank must have its file)
        writers = accelerator.num_processes
    if accelerator.process_index < writers and (problem := _rng_file_problem(folder, accelerator.process_index)):
        raise ResumeError(f"cannot resume from {folder}: {problem}; the resumed run would not be the same. "
                          "Choose another checkpoint, or start afresh with train.resume=never or in another output_dir")
    try:
        accelerator.load_state(str(folder))
    except _LOAD_ERRORS as err:
        raise ResumeError(f"cannot load checkpoint {folder} ({err.__class__.__name__}: {_first_line(err)}); "
                          "choose another checkpoint, or start afresh with train.resume=never or in another "
                          "output_dir") from err


def _writer_fields(accelerator) -> dict[str, Any]:
    """world_size / distributed_type / zero_stage of the processes running now."""
    distributed_type = getattr(accelerator, "distributed_type", "NO")
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    zero_stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    return {
        "world_size": int(getattr(accelerator, "num_processes", 1)),
        # DistributedType is a str enum: .value is the plain name ("MULTI_GPU"); str() is not, on 3.11+.
        "distributed_type": str(getattr(distributed_type, "value", distributed_type)),
        "zero_stage": int(zero_stage or 0),
    }


def read_progress(folder: str | Path) -> Progress:
    """The loop's progress in a checkpoint folder, without Accelerate."""
    return Progress.from_dict(read_json(Path(folder) / LOOP_STATE))


def read_stream_states(folder: str | Path, world_size: int = 1) -> list[dict]:
    """The data-stream state of every rank that wrote `folder`, ordered by rank. Ranks 0..n-1 must all
    be there, n being the highest rank found + 1 and at least `world_size`."""
    folder = Path(folder)
    ranks = {int(m.group(1)): child for child in folder.iterdir() if (m := _STREAM_NAME.match(child.name))}
    expected = max(world_size, max(ranks, default=-1) + 1)
    missing = sorted(set(range(expected)) - set(ranks))
    if missing:  # (no stream file at all: rank 0 is missing)
        raise FileNotFoundError(
            f"{folder} lacks the data-stream state of rank(s) {', '.join(map(str, missing))} "
            f"({stream_state_path(folder, missing[0]).name} ...): not a whole checkpoint")
    return [read_json(ranks[rank]) for rank in range(expected)]


def check_resumable(saved: Progress, now: dict[str, Any]) -> None:
    """Refuse a checkpoint whose state cannot be restored by the processes running now (`now`:
    world_size, distributed_type, zero_stage).

    DDP (and one process) checkpoints hold whole model and optimizer states: any number of
    processes can continue them (the data stream re-plans the rest of the epoch). DeepSpeed ZeRO
    partitions the optimizer state (and at stage 3 the weights) over the ranks that wrote it.
    """
    distributed_type, world_size, zero_stage = now["distributed_type"], now["world_size"], now["zero_stage"]
    was_deepspeed, is_deepspeed = saved.distributed_type == "DEEPSPEED", distributed_type == "DEEPSPEED"
    if was_deepspeed != is_deepspeed:
        raise ResumeError(
            f"the checkpoint was written under {saved.distributed_type} and this run is {distributed_type}: "
            "DeepSpeed and DDP checkpoints hold different files. Resume with the launch config it was "
            "written with, or start a new run in another output_dir"
        )
    if is_deepspeed and (saved.world_size, saved.zero_stage) != (world_size, zero_stage):
        raise ResumeError(
            f"the checkpoint was written by {saved.world_size} DeepSpeed ZeRO-{saved.zero_stage} processes and this "
            f"run has {world_size} (ZeRO-{zero_stage}): ZeRO partitions the optimizer state (and at stage 3 the "
            "weights) over the processes that wrote it, and emotrain does not re-partition it. Resume with "
            f"{saved.world_size} processes and ZeRO-{saved.zero_stage}, or start a new run in another output_dir"
        )
