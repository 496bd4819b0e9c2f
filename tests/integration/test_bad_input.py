"""Bad input and faults, as an adversarial user meets them: one row per kind of damage, and what the
real CLI must answer. The next kind of damage gets a row here.

Each `Probe` damages a fresh workspace (a copy of a small prepared corpus, of a run with two
checkpoints, a free output folder) and returns the `emotrain` command to run. Then:
  - `rc != 0`: the command ends with that status, no traceback, and its last stderr line starts with
    "emotrain" and holds every `expect` string (it names the file or key, and what to do);
  - `rc == 0`: the command succeeds (a counted, reported skip, or a fallback it says it took): some
    stderr line holds every `expect` string.
`check`, when given, then asserts what the workspace must (or must not) hold afterwards.
Every command runs under a timeout: a hang fails its row.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from tests.integration.conftest import EMOTRAIN, REPO, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

SMOKE = REPO / "configs" / "smoke.yaml"
TIMEOUT = 180


@dataclass
class Workspace:
    root: Path
    corpus: Path
    """A private copy of the prepared fixture corpus (damage it freely)."""
    run: Path
    """A private copy of a finished tiny run with checkpoints at steps 2 and 4 (see `checkpointed_run`)."""
    out: Path
    """An output folder that does not exist yet."""

    def train(self, *extra: str, output_dir: Path | None = None) -> list[str]:
        """`emotrain train` on this workspace's corpus with the tiny encoders."""
        return ["train", str(SMOKE), *tiny_overrides(self.corpus, output_dir or self.out, *extra)]

    def resume(self, *extra: str) -> list[str]:
        """`emotrain train` continuing `self.run` (the settings it was written with, two more steps)."""
        return self.train(*RUN_SETTINGS, "train.max_steps=6", *extra, output_dir=self.run)


RUN_SETTINGS = ("train.checkpoint_every_steps=2", "train.eval_every_steps=2", "train.keep_last_checkpoints=3")


@dataclass
class Probe:
    id: str
    damage: Callable[[Workspace], list[str]]
    """Damages the workspace; returns the emotrain arguments to run."""
    expect: tuple[str, ...]
    rc: int = 2
    check: Callable[[Workspace], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _non_utf8_config(ws: Workspace) -> list[str]:
    path = ws.root / "latin1.yaml"
    path.write_bytes("experiment: caf\xe9\n".encode("latin-1"))
    return ["config", str(path)]


# --- runs: planning, stopping, finished runs, disk ----------------------------------------------

_SNAPSHOTS: dict[Path, dict[str, tuple[int, bytes]]] = {}


def _tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and folder under `folder`: (mtime_ns, content) (folders: their mtime, no content)."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes() if path.is_file() else b"")
            for path in sorted([folder, *folder.rglob("*")])}


def _rerun_finished(ws: Workspace) -> list[str]:
    _SNAPSHOTS[ws.run] = _tree(ws.run)
    return ws.train(*RUN_SETTINGS, "train.max_steps=4", output_dir=ws.run)  # the very command that finished it


def _finished_run_untouched(ws: Workspace) -> None:
    before, after = _SNAPSHOTS.pop(ws.run), _tree(ws.run)
    assert after == before, sorted(key for key in set(before) | set(after) if before.get(key) != after.get(key))


def _huge_max_epochs(ws: Workspace) -> list[str]:
    # An int the config takes (`1e29` is a float: "train.max_epochs: expected int"): max_steps bounds the run.
    return ws.train("train.max_epochs=" + "1" + "0" * 29, "train.max_steps=1")


def _fp16_on_cpu(ws: Workspace) -> list[str]:
    return ws.train("train.max_steps=1", "train.mixed_precision=fp16")


def _says_fp32_not_fp16(ws: Workspace) -> None:
    log = (ws.out / "train.log").read_text()
    assert "mixed precision no" in log and "mixed precision fp16" not in log, log[-3000:]


def _read_only_output_folder(ws: Workspace) -> list[str]:
    parent = ws.root / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return ws.train(output_dir=parent / "out")


def _nothing_written_in_read_only(ws: Workspace) -> None:
    parent = ws.root / "read-only"
    assert list(parent.iterdir()) == []
    parent.chmod(0o755)  # so that pytest can clean up


PROBES: list[Probe] = [
    # --- configs ------------------------------------------------------------------------------
    Probe("config-not-utf8", _non_utf8_config, ("latin1.yaml", "UTF-8")),
    # --- data ---------------------------------------------------------------------------------

    # --- checkpoints and resume -----------------------------------------------------------------

    # --- runs: planning, stopping, finished runs, disk ------------------------------------------
    Probe("max-epochs-huge-max-steps-small", _huge_max_epochs, ("training stopped: max_steps after 1 steps",), rc=0),
    Probe("finished-run-rerun", _rerun_finished, ("holds this run, finished", "metrics.json", "nothing to do"), rc=0,
          check=_finished_run_untouched),
    pytest.param(Probe("fp16-without-cuda", _fp16_on_cpu, ("mixed_precision=fp16", "training in fp32"), rc=0,
                       check=_says_fp32_not_fp16),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU"),
                 id="fp16-without-cuda"),
    pytest.param(Probe("output-dir-read-only", _read_only_output_folder,
                       ("output_dir", "read-only", "cannot be written"), check=_nothing_written_in_read_only),
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder (chmod): "
                                          "tests/unit/test_cli_run_faults.py simulates it"), id="output-dir-read-only"),

    # --- predict / evaluate -------------------------------------------------------------------

]


@pytest.fixture(scope="session")
def checkpointed_run(synthetic_corpus, tmp_path_factory) -> Path:
    """A finished tiny run, 4 steps, with complete checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("probe-run") / "run"
    proc = subprocess.run(
        [*EMOTRAIN, "train", str(SMOKE),
         *tiny_overrides(synthetic_corpus, out, *RUN_SETTINGS, "train.max_steps=4")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-000004").is_dir()
    return out


@pytest.fixture
def workspace(synthetic_corpus, checkpointed_run, tmp_path) -> Workspace:
    ws = Workspace(root=tmp_path, corpus=tmp_path / "prepared", run=tmp_path / "run", out=tmp_path / "out")
    shutil.copytree(synthetic_corpus, ws.corpus)
    shutil.copytree(checkpointed_run, ws.run)
    return ws


@pytest.mark.parametrize("probe", PROBES, ids=lambda probe: probe.id)
def test_bad_input_gets_one_line_naming_it(probe: Probe, workspace: Workspace):
    argv = probe.damage(workspace)
    proc = subprocess.run([*EMOTRAIN, *argv], cwd=workspace.root, env=subprocess_env(**probe.env),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert proc.returncode == probe.rc, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    if probe.rc != 0:
        assert lines and lines[-1].startswith("emotrain"), proc.stderr[-4000:]
        candidates = lines[-1:]
    else:
        candidates = lines
    assert any(all(text in line for text in probe.expect) for line in candidates), (probe.expect, proc.stderr[-4000:])
    if probe.check is not None:
        probe.check(workspace)


# --- runs: a stop request before the first step ----------------------------------------------------


def test_a_stop_request_before_the_first_step_ends_the_run_at_once_and_the_same_command_starts_it(workspace):
    """SIGTERM during setup (here: once the resolved config is printed, while the data and model are
    built and an astronomically long run's steps are counted) ends the run within seconds with one
    line, exit 75 (what a preempted run exits with, which the Slurm script requeues) and nothing
    saved; the requeued command then starts the run from scratch and finishes it."""
    argv = workspace.train("train.max_epochs=" + "1" + "0" * 29, "train.max_steps=1")
    proc = subprocess.Popen([*EMOTRAIN, *argv], cwd=workspace.root, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        head = []
        for line in proc.stderr:
            head.append(line)
            if "resolved config" in line:
                break
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, tail = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(head) + tail
    assert "Traceback" not in stderr, stderr[-4000:]
    assert proc.returncode == 75 and elapsed < 15, (proc.returncode, elapsed, stderr[-4000:])
    stop_lines = [line for line in stderr.splitlines() if "stop requested" in line]
    assert len(stop_lines) == 1 and "before the first step" in stop_lines[0], stderr[-4000:]
    assert stderr.strip().splitlines()[-1] == stop_lines[0]
    assert not (workspace.out / "checkpoints").exists()

    requeued = subprocess.run([*EMOTRAIN, *argv], cwd=workspace.root, env=subprocess_env(), capture_output=True,
                              text=True, timeout=TIMEOUT)
    assert requeued.returncode == 0, requeued.stderr[-4000:]
    assert "starting fresh" in requeued.stderr and (workspace.out / "metrics.json").is_file()
