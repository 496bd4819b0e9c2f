"""Preemption: a signal or a flag file asks the run to save at the next step boundary and exit.

Handlers only set a flag (no I/O, no collectives inside a signal handler). The recipe asks
`requested()` once per optimizer step on every rank and sends the answer in the step's one small
all-reduce (`emotrain.train.step.finish_optimizer_step`, which also carries the finiteness verdict,
so a stop costs no collective of its own), so all ranks save the same step together and exit with
`EXIT_PREEMPTED`, which the Slurm scripts requeue.

SIGTERM is what Slurm and torchrun send; SIGUSR1 is what `#SBATCH --signal=B:USR1@...` sends to the
batch shell (torchrun does not forward it, so the batch script turns it into the flag file).

A flag file is a stop request only when it is *fresh* (`stop_flag_is_fresh`): touched since this
run's setup began (`started_at`). An older one is stale, left by an earlier stop, and the recipe removes it
at setup; a fresh one, touched while the run started up (the Slurm script's USR1 trap), is kept and
stops the run like a signal: before the first step at once, nothing to save.

Before the first step there is nothing to save, and no step boundary may come for a long time (the
data read, the model built and sharded, W&B reached): a watcher made with `at_once=True` (`emotrain
train`'s while it loads, then the recipe's during setup) raises `StoppedBeforeFirstStep` from the
signal handler itself, wherever setup is. The recipe then exits with `EXIT_PREEMPTED` at once, having written no checkpoint (a
requeued job simply starts the run). Setup's writes are crash-safe by design (a SIGKILL at any
moment is recovered from), so an exception at any of its points is too. `steps_begin()` ends that
mode: from then on a stop waits for a step boundary, where the state is saved.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75
"""Exit code of a run that stopped because it was asked to (EX_TEMPFAIL): it saved a checkpoint, or
stopped before its first step with nothing to save."""


class StoppedBeforeFirstStep(BaseException):
    """A stop request during setup: nothing to save, the run ends at once. A BaseException (like
    KeyboardInterrupt): raised by the signal handler wherever setup is, it must not be taken for an
    error of the library code it interrupts (`except Exception`)."""


MTIME_TOLERANCE_SECONDS = 2.0
"""A flag touched this long before the run started still counts: file times come from a coarser clock
(and on a shared filesystem, the server's), while a stale flag is an earlier job's, minutes old."""


def started_at(now: float | None = None) -> float:
    """Since when a flag file asks this run to stop (wall clock, as file times are):
    `$EMOTRAIN_STOP_FILE_SINCE` (the Slurm script sets it once it removed its job's stale flag, so a
    flag touched while the launcher starts counts), else `now` (default: this moment; the recipe
    asks when its setup begins, so a second run in the same process does not take the first one's
    flag for its own)."""
    now = time.time() if now is None else now
    since = os.environ.get("EMOTRAIN_STOP_FILE_SINCE")
    try:
        return float(since) if since else now
    except ValueError:
        return now


def stop_flag_is_fresh(flag_file: Path, since: float) -> bool:
    """Whether `flag_file` asks to stop: it exists and was last touched at or after `since` (within
    MTIME_TOLERANCE_SECONDS; an older one is stale: an earlier run's request, already served). The
    one rule for the recipe's clean-up at setup and for `PreemptionWatcher.requested`."""
    try:
        return flag_file.stat().st_mtime >= since - MTIME_TOLERANCE_SECONDS
    except OSError:  # none (or none this process may see): no request
        return False


def remove_stale_stop_flag(flag_file: Path, since: float) -> bool:
    """At setup (main process): delete `flag_file` when it is stale; returns whether a fresh one asks
    this run to stop (it is kept: the Slurm script removes its flag when the job ends)."""
    if stop_flag_is_fresh(flag_file, since):
        return True
    flag_file.unlink(missing_ok=True)
    return False


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FLAG_POLL_SECONDS = float(os.environ.get("EMOTRAIN_STOP_FILE_POLL_SECONDS", "2"))
"""How often the flag file is looked for (a stop reaches the run within this, plus one step);
`$EMOTRAIN_STOP_FILE_POLL_SECONDS` sets it (0: at every step)."""


class PreemptionWatcher:
    """Remembers a stop request from SIGTERM / SIGUSR1 or from a fresh `flag_file` (touched at or
    after `since`, default `started_at()`: `stop_flag_is_fresh`)."""

    def __init__(self, flag_file: str | Path | None = None, poll_seconds: float = FLAG_POLL_SECONDS, *,
                 at_once: bool = False, since: float | None = None):
        self.flag_file = Path(flag_file) if flag_file else None
        self.since = started_at() if since is None else since
        self.at_once = at_once
        """A stop signal raises StoppedBeforeFirstStep in the handler (until `steps_begin`)."""
        self.poll_seconds = poll_seconds
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}
        self._flag_seen = False
        self._requested_by: str | None = None
        self._next_poll = 0.0

    def install(self) -> "PreemptionWatcher":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_received = signum
        if self.at_once:
            self.at_once = False  # once: a second signal must not interrupt the way out
            raise StoppedBeforeFirstStep(self.reason())

    def watch_flag_file(self, flag_file: str | Path) -> None:
        """Also look for `flag_file` (a fresh one: see `stop_flag_is_fresh`)."""
        self.flag_file = Path(flag_file)

    def steps_begin(self) -> None:
        """Training steps begin: from now on a stop request waits for a step boundary (state to save)."""
        self.at_once = False

    def request(self, reason: str = "requested by the program") -> None:
        """A stop request from code (a test, a program embedding the recipe): like a signal."""
        self._requested_by = reason

    def requested(self) -> bool:
        """A signal came, or the flag file is fresh (looked for at most every `poll_seconds`: a `stat`
        per step would be metadata-server traffic on a parallel filesystem)."""
        if self.signal_received is not None or self._flag_seen or self._requested_by:
            return True
        if self.flag_file is not None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.poll_seconds
            self._flag_seen = stop_flag_is_fresh(self.flag_file, self.since)
        return self._flag_seen

    def reason(self) -> str:
        if self.signal_received is not None:
            return f"signal {signal.Signals(self.signal_received).name}"
        if self._flag_seen or (self.flag_file is not None and stop_flag_is_fresh(self.flag_file, self.since)):
            return f"flag file {self.flag_file}"
        return self._requested_by or "nothing"

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def default_flag_file(output_dir: str | Path) -> Path:
    """`$EMOTRAIN_STOP_FILE` if set (the Slurm scripts set it), else `output_dir/STOP`."""
    # (Imported here: this module stays light, so that `emotrain train` watches for a stop request
    # from its first second, before torch is imported.)
    from emotrain.train.run_folder import RunFolder

    return Path(os.environ.get("EMOTRAIN_STOP_FILE") or RunFolder(output_dir).stop_file)


def say_stopped_before_first_step(reason: str) -> None:
    """The one line of a run stopped before its first step (rank 0 says it: the launcher's RANK)."""
    if os.environ.get("RANK", "0") == "0":  # (before logging is set up, logging's last resort prints warnings)
        logging.getLogger("emotrain").warning(
            "stop requested (%s) before the first step: nothing to save, exiting with %d (the same command "
            "starts the run again)", reason, EXIT_PREEMPTED)
