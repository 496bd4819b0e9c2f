"""Preemption: a signal or a flag file asks the run to save at the next step boundary and exit.

Handlers only set a flag (no I/O, no collectives inside a signal handler). The recipe polls
`requested()` once per optimizer step, raises Accelerate's trigger on the rank that saw it
(`set_trigger`), and every rank calls `check_trigger()` (a collective) at the same point, so all
ranks save the same step together and exit with `EXIT_PREEMPTED`, which the Slurm scripts requeue.

SIGTERM is what Slurm and torchrun send; SIGUSR1 is what `#SBATCH --signal=B:USR1@...` sends to the
batch shell (torchrun does not forward it, so the batch script turns it into the flag file).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType

EXIT_PREEMPTED = 75
"""Exit code of a run that saved a checkpoint because it was asked to stop (EX_TEMPFAIL)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Remembers a stop request from SIGTERM / SIGUSR1 or from the existence of `flag_file`."""

    def __init__(self, flag_file: str | Path | None = None):
        self.flag_file = Path(flag_file) if flag_file else None
        self.signal_received: int | None = None
        self._previous: dict[int, object] = {}

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

    def requested(self) -> bool:
        return self.signal_received is not None or (self.flag_file is not None and self.flag_file.exists())

    def reason(self) -> str:
        if self.signal_received is not None:
            return f"signal {signal.Signals(self.signal_received).name}"
        if self.flag_file is not None and self.flag_file.exists():
            return f"flag file {self.flag_file}"
        return "nothing"

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def default_flag_file(output_dir: str | Path) -> Path:
    """`$EMOTRAIN_STOP_FILE` if set (the Slurm scripts set it), else `output_dir/STOP`."""
    return Path(os.environ.get("EMOTRAIN_STOP_FILE") or Path(output_dir) / "STOP")
