"""What produced a run: the code's git commit, the package versions, the processes and the device.

Saved into every run folder's `config.yaml` (its `provenance` section) when training starts, and
shown by `emotrain report` next to the results: a table people trust says what made it.
"""

from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("emotrain", "torch", "transformers", "accelerate", "datasets", "deepspeed", "evaluate", "wandb",
            "numpy", "soundfile", "soxr")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(source: Path | None = None) -> str:
    """The commit of the emotrain source tree (`+dirty` with uncommitted changes to tracked files),
    or `unknown (...)` when it is not a git checkout (an installed wheel)."""
    source = source or Path(__file__).resolve().parent.parent
    try:
        top = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        if Path(top).resolve() != source.resolve():  # an installed emotrain inside some other repository
            return "unknown (not a git checkout)"
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def collect(*, world_size: int, distributed_type: str, mixed_precision: str) -> dict[str, Any]:
    """This process's provenance (call on the main process; the values are the same on every rank)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {
        "git_commit": git_commit(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "world_size": world_size,
        "distributed_type": distributed_type,
        "mixed_precision": mixed_precision,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def merge_with_earlier(current: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """`current`, remembering an earlier start of the same run under other code or packages
    (a resumed run may have been requeued onto another installation)."""
    if not earlier:
        return current
    history = list(earlier.get("earlier", []))
    previous = {key: value for key, value in earlier.items() if key != "earlier"}
    if (previous.get("git_commit"), previous.get("packages")) != (current["git_commit"], current["packages"]):
        history.append(previous)
    return {**current, **({"earlier": history} if history else {})}
