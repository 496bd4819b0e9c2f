"""The run folder: its layout, what "finished" means, its best model's atomic export, and the checks
before a training writes into it.

    run = RunFolder(cfg.output_dir)
    run.check_config(cfg)                       # before anything is written (`check_run_folder`)
    run.recover()                               # main process, holding the lock: an interrupted best/ export
    with run.writing_best() as folder:          # best/ replaced atomically
        model.save_pretrained(folder, processors=..., state_dict=...)
        save_config(cfg, folder / "config.yaml", provenance=...)
    run.write_metrics(results, data_path=cfg.data.path, split=split)    # last: now the run is finished

    output_dir/
      config.yaml       the resolved config (and its `provenance`), saved when a training starts
      train.log, history.jsonl   the log, and every logged scalar (`emotrain report`'s curves)
      checkpoints/      `emotrain.train.checkpoint`; deleted once the run is finished, unless
                        train.keep_checkpoints_after_finish (`drop_checkpoints`: renamed to
                        .deleting-checkpoints/ first, which the next start removes if a kill left it)
      best/             the best model (`EmotionModel.save_pretrained`) and its config.yaml
      .partial-best/    a best/ being written; .replaced-best/ the previous best/ while the new one takes its place
      metrics.json      written last, atomically, with `data`: what the run trained on (`data_fingerprint`)
      .lock, STOP       held by the training writing the folder; a stop request

*Finished* (`is_finished`, the one definition `emotrain train`, `emotrain cv` and `emotrain report`
use): metrics.json holds the results the run wrote at its end, whatever the fold (fold 0 trains on
everything and has no test set: finished too), and no best/ export is cut short. `emotrain report`
counts the finished runs that hold test metrics (`finished_metrics(tested=True)`). best/ is
published before metrics.json and never half-written: it is written into `.partial-best/` and
swapped into place through a journal (old folder aside, new one into place, aside deleted);
`recover` finishes or undoes a swap a crash interrupted.

One experiment per folder. Rerunning the same command resumes it (`train.resume=auto`), or once it
is finished does nothing (`check_finished`: the recipe says where the results are;
`train.resume=never` or a checkpoint folder start it afresh, or restart it from there); rerunning
it with, say, another `train.lr` would resume the old run's checkpoint under the new settings, or
overwrite part of its outputs, and `metrics.json` would then describe neither. Keys that change only
speed, memory, logging, where things are read and written, or the execution resources (like the
number of processes, the number of data workers) (`RESULT_NEUTRAL_KEYS`, marked `neutral` in
`emotrain.config`) may differ freely. `data.path` is one of them (the same data, moved): what a
finished run trained on is checked by its data fingerprint instead (`check_data`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from emotrain.config import PROVENANCE_KEY, Config, ConfigError, neutral_reason, result_neutral_keys
from emotrain.data.state import DATA_FINGERPRINT_KEYS, data_difference, data_fingerprint
from emotrain.train.checkpoint import (
    CONFIG as CHECKPOINT_CONFIG,
)
from emotrain.train.checkpoint import (
    fsync_dir,
    holds_checkpoint_state,
    latest_checkpoint,
    stream_state_path,
    write_json,
)

CONFIG_FILE = "config.yaml"
"""What the recipe saves the resolved config as, in output_dir (and in best/)."""
METRICS_FILE = "metrics.json"
BEST_DIR = "best"
CHECKPOINTS_DIR = "checkpoints"
HISTORY_FILE = "history.jsonl"
"""Every logged scalar of a run, one JSON object per `accelerator.log` call (`emotrain report`'s curves)."""
LOG_FILE = "train.log"
LOCK_FILE = ".lock"
"""Held (flock) by the training process that writes the folder, for its whole life."""
STOP_FILE = "STOP"
"""The flag file that asks the training to save and stop (unless $EMOTRAIN_STOP_FILE names another)."""
_BEST_PARTIAL = ".partial-best"
_BEST_ASIDE = ".replaced-best"
_CHECKPOINTS_DELETING = ".deleting-checkpoints"

RESULT_NEUTRAL_KEYS = result_neutral_keys()
"""Dotted config keys that do not change a run's result (marked `neutral` in `emotrain.config`, with
why); an entry ending in `.` covers every key under it. Anything else that differs between a run
folder's saved config and a new one is a conflict."""

_MISSING = "<missing>"


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
        if neutral_reason(key) is not None:
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


class RunFolder:
    """One run's folder: where each of its files is, whether the run is finished, and writing its
    results (see the module docstring). Paths only: nothing is created until something is written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- layout --------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def log(self) -> Path:
        return self.path / LOG_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def stop_file(self) -> Path:
        return self.path / STOP_FILE

    @property
    def _best_partial(self) -> Path:
        return self.path / _BEST_PARTIAL

    @property
    def _best_aside(self) -> Path:
        return self.path / _BEST_ASIDE

    @property
    def _checkpoints_deleting(self) -> Path:
        return self.path / _CHECKPOINTS_DELETING

    # -- reading -------------------------------------------------------------------------------

    def is_started(self) -> bool:
        """A training started here: it saves config.yaml before anything else."""
        return self.config.is_file()

    def read_config(self) -> dict[str, Any]:
        """The saved config.yaml as plain data (its `provenance` section included). Raises OSError,
        yaml.YAMLError, or ValueError when it holds no mapping."""
        loaded = yaml.safe_load(self.config.read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.config} does not hold a config")
        return loaded

    def read_metrics(self) -> dict[str, Any] | None:
        """metrics.json, or None before the run wrote it. Raises OSError or ValueError when it cannot
        be read (say, one cut short by hand: the recipe writes it atomically)."""
        try:
            loaded = json.loads(self.metrics.read_text())
        except FileNotFoundError:
            return None
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.metrics} does not hold metrics")
        return loaded

    def finished_metrics(self, *, tested: bool = False) -> dict[str, Any] | None:
        """metrics.json when the run is finished (`is_finished`), else None; with `tested`, only when
        it holds test metrics too (a fold-0 run has none). Raises like `read_metrics`."""
        metrics = self.read_metrics()
        finished = metrics is not None and _holds_final_results(metrics) and not self._best_aside.exists()
        return metrics if finished and (not tested or metrics.get("test")) else None

    def is_finished(self) -> bool:
        """The run wrote its final metrics (`_holds_final_results`; with or without a test set), and
        best/ is whole: no export of it was cut short (a swap `recover` has not yet finished or
        undone). Never raises: an unreadable metrics.json is not finished."""
        try:
            return self.finished_metrics() is not None
        except (OSError, ValueError):
            return False

    def holds_results(self) -> bool:
        """Whether a run left something another config would be mixed with: a complete checkpoint,
        best/ or metrics.json. (A run that failed before its first checkpoint, e.g. on a config
        value checked at model build, left only its config.yaml: the corrected command may reuse it.)"""
        return (
            self.metrics.is_file() or self.best.is_dir() or self._best_aside.is_dir()
            # Partial and aside folders too: crash recovery would publish them before resume=auto picks one.
            or holds_checkpoint_state(self.checkpoints)
        )

    # -- checks --------------------------------------------------------------------------------

    def check_config(self, cfg: Config) -> None:
        """Raise RunFolderConflict if the folder holds a run's results (`holds_results`) and its
        config.yaml differs from `cfg` in a key that changes the result (see RESULT_NEUTRAL_KEYS).
        A folder without results passes, and so does one whose saved config differs only in neutral keys."""
        if not self.holds_results():
            return
        todo = f"choose another output_dir, or delete {self.path} to start over"
        if not self.config.is_file():
            raise RunFolderConflict(f"{self.path} holds a run's results but no {CONFIG_FILE}: {todo}")
        try:
            saved = self.read_config()
        except (OSError, yaml.YAMLError) as err:
            reason = " ".join(str(err).split())
            raise RunFolderConflict(f"cannot read the run's config {self.config} ({reason}): {todo}") from None
        except ValueError:
            raise RunFolderConflict(f"{self.config} does not hold a config: {todo}") from None
        saved.pop(PROVENANCE_KEY, None)  # how the run was produced, not what it is
        differences = config_differences(saved, cfg.to_dict(), defaults=Config().to_dict())
        if differences:
            if any(key == "train.seed" for key, _, _ in differences):
                todo += (" (another seed in its own folder: output_dir=runs/{experiment}/fold{fold}-seed{seed}, "
                         "what `emotrain cv --seeds` writes)")
            listed = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, old, new in differences)
            raise RunFolderConflict(
                f"{self.path} holds a run with another config ({self.config}), resuming or overwriting it would mix "
                f"two experiments. Differences: {listed}. To train this config, {todo}; to continue that "
                "run, use its config."
            )

    def check_writable(self) -> None:
        """Raise ConfigError naming output_dir when it (or, before it exists, the folder it would be
        made in) cannot be written: a read-only filesystem, or no permission. Checked before a run
        builds anything; `access` answers for this process, root included (a read-only mount)."""
        existing = self.path.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
            where = "output_dir" if existing == self.path.absolute() else f"the folder output_dir goes in, {existing}"
            raise ConfigError("output_dir", (
                f"{self.path} cannot be written ({where} is on a read-only filesystem, or this user may not write "
                "it): choose another output_dir, or make it writable"))

    def check_finished(self, cfg: Config, fingerprint: Callable[[], dict[str, Any]]) -> str:
        """For a finished run (`is_finished`) asked for again: the line saying that it is finished
        and where its results are, after checking it is this run (`check_config`, `check_data`:
        another config or other data raises RunFolderConflict, as a run in progress would)."""
        self.check_config(cfg)
        unchecked = self.check_data(cfg.data.path, fingerprint)
        return (f"emotrain train: {self.path} holds this run, finished: results in {self.metrics}, the best model in "
                f"{self.best}; nothing to do (a finished run is not trained further: to train longer or otherwise, "
                f"use another output_dir){f'; note: {unchecked}' if unchecked else ''}")

    def trained_data(self) -> dict[str, Any] | None:
        """What the run trained on: `{"path": data.path then, **data_fingerprint}`, from metrics.json
        (`write_metrics` records it), or for a run written before emotrain recorded it there, from
        its newest current checkpoint (every rank's stream state holds the same fingerprint). None
        when neither says."""
        try:
            recorded = (self.read_metrics() or {}).get("data")
        except (OSError, ValueError):
            recorded = None
        if isinstance(recorded, dict) and all(key in recorded for key in DATA_FINGERPRINT_KEYS):
            return recorded
        checkpoint = latest_checkpoint(self.checkpoints)
        if checkpoint is None:
            return None
        try:
            state = json.loads(stream_state_path(checkpoint, 0).read_text())
            saved_config = yaml.safe_load((checkpoint / CHECKPOINT_CONFIG).read_text())
            path = saved_config["data"]["path"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not all(key in state for key in DATA_FINGERPRINT_KEYS):
            return None
        return {"path": path, **{key: state[key] for key in DATA_FINGERPRINT_KEYS}}

    def check_data(self, data_path: str, fingerprint: Callable[[], dict[str, Any]]) -> str | None:
        """Raise RunFolderConflict if the run trained on other data than `data_path`'s, whose
        `data_fingerprint` `fingerprint()` computes (called only when the run says what it trained on).
        `data.path` is result-neutral (the same data, moved, is the same run), the data is not.

        A run that records no fingerprint (written before emotrain recorded one, its checkpoints
        gone) cannot be checked: it is accepted, and the returned note says so (None otherwise).
        Refusing it would leave every such result unusable without retraining it."""
        if not self.holds_results():  # nothing trained here yet: nothing to mix
            return None
        recorded = self.trained_data()
        if recorded is None:
            return (f"{self.path} does not record the data it trained on (written by an older emotrain, "
                    f"its checkpoints gone): not checked against data.path={data_path}")
        difference = data_difference(recorded, fingerprint())
        if difference is not None:
            raise RunFolderConflict(
                f"{self.path} holds a run trained on other data ({recorded.get('path')}) than data.path={data_path} "
                f"({difference}): counting or continuing it would mix two datasets. To train on this data, "
                f"choose another output_dir, or delete {self.path} to start over; to use that run, give its data."
            )
        return None

    # -- writing -------------------------------------------------------------------------------

    def write_metrics(self, results: dict[str, Any], *, data_path: str, split) -> None:
        """Main process only, last: write metrics.json atomically (a run killed while writing must not
        leave half a file that says "finished"), with `data`: what the run trained on (`data_path`
        and `data_fingerprint(split)`, which `check_data` compares). `split`: the run's `FoldSplit`."""
        write_json(self.metrics, {**results, "data": {"path": str(data_path), **data_fingerprint(split)}})
        fsync_dir(self.path)

    @contextmanager
    def writing_best(self) -> Iterator[Path]:
        """Main process only. Yields an empty folder to write the best model into (`.partial-best/`);
        when the block ends normally, its files are synced and it replaces best/ through a journal:
        best/ renamed aside, the new folder renamed into place, the aside deleted. A crash at any
        moment leaves the old complete best/ or the new one (`recover` finishes or undoes the swap);
        an exception in the block leaves best/ as it was. Never counts as finished half-way: the
        recipe writes metrics.json after it, and `is_finished` waits for an interrupted swap."""
        self.recover()
        partial = self._best_partial
        partial.mkdir(parents=True)
        try:
            yield partial
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        _fsync_tree(partial)
        self._swap_best()

    def _swap_best(self) -> None:
        best, aside = self.best, self._best_aside
        if best.exists():
            os.rename(best, aside)
            fsync_dir(self.path)
        os.rename(self._best_partial, best)
        fsync_dir(self.path)
        shutil.rmtree(aside, ignore_errors=True)

    def drop_checkpoints(self) -> bool:
        """Main process only, once the run is finished (metrics.json written): delete checkpoints/.
        It is renamed to `.deleting-checkpoints` first (atomic, made durable), then removed: a kill
        midway never leaves a checkpoints/ holding part of a checkpoint for a restart to trust, only
        the hidden folder, which the next start removes (`finish_dropping_checkpoints`). Returns
        whether there were checkpoints."""
        self.finish_dropping_checkpoints()  # an earlier deletion's leftover: the rename needs its name
        if not self.checkpoints.exists():
            return False
        os.rename(self.checkpoints, self._checkpoints_deleting)
        fsync_dir(self.path)
        self.finish_dropping_checkpoints()
        return True

    def finish_dropping_checkpoints(self) -> str | None:
        """Main process: remove the `.deleting-checkpoints` folder a `drop_checkpoints` cut short left
        (only it makes that name). Returns what was done, or None when there was none."""
        if not self._checkpoints_deleting.exists():
            return None
        shutil.rmtree(self._checkpoints_deleting, ignore_errors=True)
        return f"deleted {_CHECKPOINTS_DELETING} (a deletion of the finished run's checkpoints cut short)"

    def recover(self) -> list[str]:
        """Main process, holding the lock, before anything is written (the recipe at setup;
        `writing_best` too): finish or undo a best/ export a crash interrupted, and finish a deletion
        of checkpoints/ cut short (`finish_dropping_checkpoints`). Returns what was done.
          - `.replaced-best/` beside best/: the swap was done, deleting the old folder was cut short: deleted;
          - `.replaced-best/` without best/: cut short between the two renames: renamed back (the new
            folder's run re-exports it: it wrote no metrics.json after it);
          - `.partial-best/`: an export cut short, whole or not (nothing says): deleted."""
        done = []
        if self._best_aside.exists():
            if self.best.exists():
                shutil.rmtree(self._best_aside)
                done.append(f"deleted {_BEST_ASIDE}: {BEST_DIR} had replaced it")
            else:
                os.rename(self._best_aside, self.best)
                fsync_dir(self.path)
                done.append(f"renamed {_BEST_ASIDE} back to {BEST_DIR} (interrupted export rolled back)")
        if self._best_partial.exists():
            shutil.rmtree(self._best_partial)
            done.append(f"deleted {_BEST_PARTIAL} (an export cut short)")
        if dropped := self.finish_dropping_checkpoints():
            done.append(dropped)
        return done


def _holds_final_results(metrics: dict[str, Any]) -> bool:
    """Whether metrics.json holds what `finish` writes at a run's very end, in one atomic write:
    `stop_reason` for every fold (every emotrain version wrote it), and test metrics when the fold
    has a test set. Either one says the run got to its end."""
    return "stop_reason" in metrics or bool(metrics.get("test"))


def _fsync_tree(folder: Path) -> None:
    """Every file under `folder`, then every folder, on disk: a renamed folder is whole after a power cut."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def holds_results(output_dir: str | Path) -> bool:
    """`RunFolder(output_dir).holds_results()`."""
    return RunFolder(output_dir).holds_results()


def check_run_folder(output_dir: str | Path, cfg: Config) -> None:
    """`RunFolder(output_dir).check_config(cfg)`."""
    RunFolder(output_dir).check_config(cfg)


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
        self.path = RunFolder(output_dir).lock
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
    if not RunFolder(output_dir).lock.exists():
        return
    probe = RunFolderLock(output_dir)
    try:
        probe.acquire()
    except RunFolderBusy:
        say("an earlier training in this folder is still running (saving after a stop?): waiting for it to end")
        probe.acquire(wait=True)
    finally:
        probe.release()
