"""Refuse to train into a run folder whose saved config would give another result.

    check_run_folder(cfg.output_dir, cfg)   # before anything is written into output_dir

A run folder holds one experiment: its `config.yaml`, checkpoints, `best/` and metrics. Rerunning
the same command resumes it (`train.resume=auto`); rerunning it with, say, another `train.lr` would
resume the old run's checkpoint under the new settings, or overwrite part of its outputs, and
`metrics.json` would then describe neither. Keys that change only speed, memory, logging, where
things are read and written, or the execution resources (like the number of processes, the number
of data workers) (`RESULT_NEUTRAL_KEYS`) may differ freely.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import yaml

from emotrain.config import PROVENANCE_KEY, Config, ConfigError
from emotrain.train.checkpoint import holds_checkpoint_state

CONFIG_FILE = "config.yaml"
"""What the recipe saves the resolved config as, in output_dir."""

RESULT_NEUTRAL_KEYS = frozenset(
    {
        "output_dir",  # the same run moved or reached under another path
        "train.resume",  # how to continue, not what is trained
        "data.path",  # the same prepared data, elsewhere (another mount, a copy, a URL)
        # Loader processes, like the number of ranks: an execution resource, deliberately allowed to
        # change (a resumed job may get other CPUs). The batches of later epochs follow the new count
        # (each utterance still once per epoch); the rest of the current one is re-planned.
        "data.num_workers",
        "train.gradient_checkpointing",  # recomputes the same activations (memory for time)
        "train.fused_optimizer",  # the same update in one kernel launch
        "model.attention",  # the same attention, other kernels
        "train.checkpoint_every_steps",  # when state is saved, not what is trained
        "train.keep_last_checkpoints",
        "train.max_consecutive_nonfinite",  # a safety stop: a run it would stop gives no result
        "logging.",  # trackers, names, tags, log frequency, progress bar
    }
)
"""Dotted config keys that do not change a run's result; an entry ending in `.` covers every key
under it. Anything else that differs between a run folder's saved config and a new one is a
conflict."""

_MISSING = "<missing>"


def _is_neutral(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESULT_NEUTRAL_KEYS)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} → {"train.lr": 1e-3}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def config_differences(saved: dict, new: dict, defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) for every result-changing key whose values differ.

    `saved` and `new` are nested plain data (`Config.to_dict()`, or a config.yaml as read). A key
    present on one side only counts, with the string "<missing>" on the other side: a config saved
    by another emotrain version may not mean the same run. Except, with `defaults` (the default
    config's data), a key the saved config lacks that the new one sets to its default: a key is only
    added with a default that does what emotrain did before it existed. Sorted by key.
    """
    old_flat, new_flat = _flatten(saved or {}), _flatten(new or {})
    default_flat = _flatten(defaults or {})
    differences = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if _is_neutral(key):
            continue
        old, current = old_flat.get(key, _MISSING), new_flat.get(key, _MISSING)
        if old is _MISSING and key in default_flat and current == default_flat[key]:
            continue  # added since that run, at the default that reproduces it
        if old != current or type(old) is not type(current):  # 1 == 1.0 == True, yet they differ
            differences.append((key, old, current))
    return differences


class RunFolderConflict(ConfigError):
    """output_dir already holds a run whose saved config differs in a result-changing key."""

    def __init__(self, message: str):
        super().__init__("output_dir", message)


def holds_results(output_dir: str | Path) -> bool:
    """Whether a run left something another config would be mixed with: a complete checkpoint,
    `best/` or `metrics.json`. (A run that failed before its first checkpoint, e.g. on a config
    value checked at model build, left only its config.yaml: the corrected command may reuse it.)"""
    folder = Path(output_dir)
    return (
        (folder / "metrics.json").is_file() or (folder / "best").is_dir()
        # Partial and aside folders too: crash recovery would publish them before resume=auto picks one.
        or holds_checkpoint_state(folder / "checkpoints")
    )


def check_run_folder(output_dir: str | Path, cfg: Config) -> None:
    """Raise RunFolderConflict if `output_dir` holds a run's results (`holds_results`) and its
    `config.yaml` differs from `cfg` in a key that changes the result (see RESULT_NEUTRAL_KEYS).
    A folder without results passes, and so does one whose saved config differs only in neutral keys."""
    path = Path(output_dir) / CONFIG_FILE
    if not holds_results(output_dir):
        return
    todo = f"choose another output_dir, or delete {output_dir} to start over"
    if not path.is_file():
        raise RunFolderConflict(f"{output_dir} holds a run's results but no {CONFIG_FILE}: {todo}")
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise RunFolderConflict(f"cannot read the run's config {path} ({reason}): {todo}") from None
    if not isinstance(saved, dict):
        raise RunFolderConflict(f"{path} does not hold a config: {todo}")
    saved.pop(PROVENANCE_KEY, None)  # how the run was produced, not what it is
    differences = config_differences(saved, cfg.to_dict(), defaults=Config().to_dict())
    if differences:
        if any(key == "train.seed" for key, _, _ in differences):
            todo += (" (another seed in its own folder: output_dir=runs/{experiment}/fold{fold}-seed{seed}, "
                     "what `emotrain cv --seeds` writes)")
        listed = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, old, new in differences)
        raise RunFolderConflict(
            f"{output_dir} holds a run with another config ({path}), resuming or overwriting it would mix "
            f"two experiments. Differences: {listed}. To train this config, {todo}; to continue that "
            "run, use its config."
        )


LOCK_FILE = ".lock"
"""Held (flock) by the training process that writes the folder, for its whole life."""


class RunFolderBusy(ConfigError):
    """Another training process holds output_dir: two runs writing one folder would corrupt it."""

    def __init__(self, message: str):
        super().__init__("output_dir", message)


class RunFolderLock:
    """An exclusive `flock` on `output_dir/.lock` for as long as this object (or its process) lives.

    The lock goes with the process: a killed run releases it, so a requeued job takes it again. On a
    filesystem without flock (some Lustre/NFS mounts) locking is skipped: `acquire` returns False.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; raise RunFolderBusy if another process holds it (or wait for it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            self.release()
            raise RunFolderBusy(f"{self.path.parent} is being written by a training still running ({holder}): "
                                "wait for it to end (a stopped run saves first), or use another output_dir") from None
        except OSError:  # no flock on this filesystem
            self.release()
            return False
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode())
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def wait_until_free(output_dir: str | Path, say=print) -> None:
    """Block while a training process holds the run folder's lock (e.g. one saving after a stop)."""
    if not (Path(output_dir) / LOCK_FILE).exists():
        return
    probe = RunFolderLock(output_dir)
    try:
        probe.acquire()
    except RunFolderBusy:
        say("an earlier training in this folder is still running (saving after a stop?): waiting for it to end")
        probe.acquire(wait=True)
    finally:
        probe.release()
