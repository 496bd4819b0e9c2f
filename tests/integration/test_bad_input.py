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

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

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


# --- data: damaged or incomplete prepared data (emotrain/data) ----------------------------------

SHARD = "session2/data-00003-of-00008.parquet"
"""A training shard of fold 1 (and of the test run's data for `emotrain evaluate`)."""


def _evaluate(ws: Workspace) -> list[str]:
    return ["evaluate", str(ws.run / "best"), str(ws.corpus)]


def _train_briefly(ws: Workspace) -> list[str]:
    return ws.train("train.max_steps=2")


def _after(damage: Callable[[Workspace], None], command: Callable[[Workspace], list[str]]):
    """A probe's `damage`: `damage(ws)`, then the arguments `command(ws)` gives."""
    def damaged(ws: Workspace) -> list[str]:
        damage(ws)
        return command(ws)
    return damaged


def _delete_shard(ws: Workspace) -> None:
    (ws.corpus / SHARD).unlink()


def _truncate_shard(ws: Workspace) -> None:
    shard = ws.corpus / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _swap_dataset_labels(ws: Workspace) -> list[str]:
    path = ws.corpus / "dataset.json"
    info = json.loads(path.read_text())
    info["labels"][:2] = info["labels"][1::-1]
    path.write_text(json.dumps(info))
    return _train_briefly(ws)


def _dataset_json_not_json(ws: Workspace) -> list[str]:
    (ws.corpus / "dataset.json").write_text("{not json\n")
    return _train_briefly(ws)


def _data_path_is_a_file(ws: Workspace) -> list[str]:
    (ws.root / "prepared.txt").write_text("not a folder\n")
    return ws.train(f"data.path={ws.root / 'prepared.txt'}")


def _no_output_folder(ws: Workspace) -> None:
    assert not ws.out.exists(), sorted(p.name for p in ws.out.iterdir())


PROBES: list[Probe] = [
    # --- configs ------------------------------------------------------------------------------
    Probe("config-not-utf8", _non_utf8_config, ("latin1.yaml", "UTF-8")),
    # --- data ---------------------------------------------------------------------------------
    Probe("data-shard-deleted-train", _after(_delete_shard, _train_briefly),
          ("session2 is missing data-00003-of-00008.parquet", "emotrain prepare"), check=_no_output_folder),
    Probe("data-shard-deleted-evaluate", _after(_delete_shard, _evaluate),
          ("session2 is missing data-00003-of-00008.parquet", "emotrain prepare")),
    Probe("data-shard-truncated-train", _after(_truncate_shard, _train_briefly),
          (SHARD, "damaged", "emotrain prepare"), check=_no_output_folder),
    Probe("data-shard-truncated-evaluate", _after(_truncate_shard, _evaluate),
          (SHARD, "damaged", "emotrain prepare")),
    Probe("data-labels-swapped-in-dataset-json", _swap_dataset_labels,
          ("dataset.json lists the labels ['happy', 'neutral'", "prepared with ['neutral', 'happy'",
           "emotrain prepare"), check=_no_output_folder),
    Probe("data-dataset-json-not-json", _dataset_json_not_json,
          ("dataset.json is not a dataset description", "emotrain prepare")),
    Probe("data-fold-out-of-range", lambda ws: ws.train("data.fold=9"), ("data.fold", "is 9", "[1, 2, 3, 4, 5]"),
          check=_no_output_folder),
    Probe("data-path-local-file-no-credentials-hint", _data_path_is_a_file,
          ("data.path", "prepared.txt", "must name a folder")),
    Probe("data-prepare-fails-leaves-no-folder", lambda ws: ["prepare", str(ws.root / "no-release"), str(ws.out)],
          ("no-release does not exist",), check=_no_output_folder),

    # --- checkpoints and resume -----------------------------------------------------------------

    # --- runs: planning, stopping, finished runs, disk ------------------------------------------

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
