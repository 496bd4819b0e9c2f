"""Checkpoint folders: atomic save, `resume=auto`, rotation.

    output_dir/checkpoints/
      step-000200/          Accelerate state (model, optimizer, scheduler, scaler, RNG of every rank),
                            stream-rank{r}.json (data position of every rank), loop_state.json,
                            config.yaml, and COMPLETE, written last
      .partial-step-000400/ being written: never picked by resume

Saving writes into a `.partial-` folder on every rank (DeepSpeed's `save_state` is a collective, so
all ranks call it), then the main process adds the loop state, config and `COMPLETE` marker and
renames the folder into place. A crash at any moment leaves either a complete folder or one that
`latest_checkpoint` ignores. Folders are named by optimizer step, not by Accelerate's automatic
counter (which `load_state` does not restore).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
LOOP_STATE = "loop_state.json"
CONFIG = "config.yaml"
_NAME = re.compile(r"^step-(\d{6,})$")
_PARTIAL_PREFIX = ".partial-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def partial_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """Where every rank writes checkpoint `step` before it is complete."""
    return Path(checkpoints_dir) / f"{_PARTIAL_PREFIX}{checkpoint_name(step)}"


def stream_state_path(folder: str | Path, rank: int) -> Path:
    return Path(folder) / f"stream-rank{rank}.json"


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON durably: to a temporary name, fsync, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finalize(checkpoints_dir: str | Path, step: int, loop_state: dict, config_yaml: str) -> Path:
    """Main process only, after every rank has written into the partial folder: mark and publish it."""
    partial = partial_dir(checkpoints_dir, step)
    write_json(partial / LOOP_STATE, loop_state)
    (partial / CONFIG).write_text(config_yaml)
    marker = partial / COMPLETE
    with open(marker, "w") as handle:
        handle.write(f"{step}\n")
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(partial)
    final = Path(checkpoints_dir) / checkpoint_name(step)
    if final.exists():  # the same step saved again (e.g. a rerun that resumed exactly here)
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(Path(checkpoints_dir))
    return final


def complete_checkpoints(checkpoints_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE).is_file() and (child / LOOP_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, checkpoints_dir: str | Path) -> Path | None:
    """`train.resume` → the folder to load, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoints_dir)
    folder = Path(resume)
    if not (folder / COMPLETE).is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    return folder


def rotate(checkpoints_dir: str | Path, keep_last: int, keep_steps: set[int] = frozenset()) -> list[Path]:
    """Delete complete checkpoints except the newest `keep_last` and those in `keep_steps` (the best),
    and leftover partial folders from crashed saves. Main process only. Returns what was removed."""
    found = complete_checkpoints(checkpoints_dir)
    keep = {step for step, _ in found[-keep_last:]} | set(keep_steps)
    removed = []
    for step, folder in found:
        if step not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for leftover in Path(checkpoints_dir).glob(f"{_PARTIAL_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


# ---------------------------------------------------------------------------------------------
# The loop's own state, and saving a whole checkpoint (every rank calls this).


@dataclass
class LoopState:
    """Where the training loop stands; saved as JSON in every checkpoint."""

    epoch: int = 0
    """The epoch the data stream is in (the next one after an epoch-end checkpoint)."""
    step: int = 0
    """Optimizer steps taken."""
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoopState":
        return cls(**data)


def save_checkpoint(
    accelerator,
    checkpoints_dir: str | Path,
    step: int,
    *,
    stream_state: dict,
    loop_state: LoopState,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Save model/optimizer/scheduler/scaler/RNG (Accelerate), this rank's stream state and the loop
    state atomically, then rotate. A collective: every rank must call it at the same step."""
    partial = partial_dir(checkpoints_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a save that was killed
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # DeepSpeed: every rank writes its partition
    write_json(stream_state_path(partial, accelerator.process_index), stream_state)
    accelerator.wait_for_everyone()
    final = Path(checkpoints_dir) / checkpoint_name(step)
    if accelerator.is_main_process:
        final = finalize(checkpoints_dir, step, loop_state.to_dict(), config_yaml)
        best = {loop_state.best_step} if loop_state.best_step is not None else set()
        rotate(checkpoints_dir, keep_last, keep_steps=best)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: str | Path) -> tuple[LoopState, dict]:
    """Restore Accelerate's state from `folder`; return the loop state and this rank's stream state."""
    folder = Path(folder)
    accelerator.load_state(str(folder))
    stream_file = stream_state_path(folder, accelerator.process_index)
    if not stream_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no data-stream state for rank {accelerator.process_index}: "
            "resume with the world size the checkpoint was written with"
        )
    return LoopState.from_dict(read_json(folder / LOOP_STATE)), read_json(stream_file)
