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
