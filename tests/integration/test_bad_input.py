"""Bad input and faults, as an adversarial user meets them: one row per kind of damage, and what the
real CLI must answer. The next kind of damage gets a row here.

Each `Probe` damages a fresh workspace (a copy of a small prepared corpus, of a run with two
checkpoints, a free output folder) and returns the `emotrain` command to run. Then:
  - `rc != 0`: the command ends with that status, no traceback, and its last stderr line starts with
    "emotrain" and holds every `expect` string (it names the file or key, and what to do);
  - `rc == 0`: the command succeeds (a counted, reported skip, or a fallback it says it took): some
    stderr line holds every `expect` string (none given: nothing is asked of stderr).
`absent` strings (a secret the input carried) must appear in neither stdout nor stderr. `check`, when
given, then asserts what the workspace must (or must not) hold afterwards.
Every command runs under a timeout: a hang fails its row.
"""

from __future__ import annotations

import json
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


RUN_SETTINGS = ("train.checkpoint_every_steps=2", "train.eval_every_steps=2", "train.keep_last_checkpoints=3",
                "train.keep_checkpoints_after_finish=true")  # the probes damage them after the run finished


@dataclass
class Probe:
    id: str
    damage: Callable[[Workspace], list[str]]
    """Damages the workspace; returns the emotrain arguments to run."""
    expect: tuple[str, ...]
    rc: int = 2
    check: Callable[[Workspace], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ()
    """Strings that must appear nowhere in stdout or stderr (a secret the input carried)."""


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


def _shard_copied_over_another_group(ws: Workspace) -> None:
    """A shard of session 2 copied over one of session 3: the same rows twice, every count unchanged."""
    shutil.copyfile(ws.corpus / "session2" / "data-00000-of-00008.parquet",
                    ws.corpus / "session3" / "data-00000-of-00008.parquet")


def _truncate_shard(ws: Workspace) -> None:
    shard = ws.corpus / SHARD
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _copy_of_a_shard(ws: Workspace) -> None:
    """What a file manager's copy is named; without the report's row counts only the name tells."""
    (ws.corpus / "prepare_report.json").unlink()
    shard = ws.corpus / "session2" / "data-00000-of-00008.parquet"
    shutil.copy(shard, shard.with_name("data-00000-of-00008 (1).parquet"))


def _remove_a_group_folder(ws: Workspace) -> None:
    shutil.rmtree(ws.corpus / "session3")


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

# --- checkpoints and resume: damage to ws.run's latest checkpoint (step-000004) ---------------------


def _interrupted_run(ws: Workspace, *extra: str) -> list[str]:
    """Make `ws.run` a run killed after its step-4 checkpoint (no metrics.json, no best/) and return the
    command that continues it: its own, unchanged (another train.max_steps would be another
    experiment, which the run folder refuses). From step 4 there is nothing left to train; from
    step 2, two steps."""
    (ws.run / "metrics.json").unlink()
    shutil.rmtree(ws.run / "best")
    return ws.train(*RUN_SETTINGS, "train.max_steps=4", *extra, output_dir=ws.run)


def _step(ws: Workspace, step: int) -> Path:
    return ws.run / "checkpoints" / f"step-{step:06d}"


def _without_manifests(ws: Workspace) -> None:
    """As if the run was written before checkpoints recorded a manifest."""
    for step in (2, 4):
        (_step(ws, step) / "manifest.json").unlink(missing_ok=True)


# --- predict / evaluate, manifests (inputs) ---------------------------------------------------

MANIFEST_ROWS = (("calm", "train"), ("fear", "train"), ("calm", "train"), ("fear", "train"), ("calm", "test"),
                 ("fear", "test"))


def _clip(path: Path, peak: float = 0.3, seconds: float = 0.5) -> Path:
    """A tone at `peak` as a float wav (a float file holds any amplitude, 1e30 too)."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (peak * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000, subtype="FLOAT")
    return path


def _manifest(ws: Workspace, encoding: str, text: str = "words") -> Path:
    """A prepare manifest of six clips (train and test split), written in `encoding`."""
    lines = ["audio,text,label,speaker,split"]
    for i, (label, split) in enumerate(MANIFEST_ROWS):
        _clip(ws.root / "corpus" / "clips" / f"c{i}.wav")
        lines.append(f"clips/c{i}.wav,{text} {i},{label},s{i % 2},{split}")
    path = ws.root / "corpus" / "meta.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def _prepare_bom_manifest(ws: Workspace) -> list[str]:
    return ["prepare", str(_manifest(ws, "utf-8-sig")), str(ws.out), "--workers", "1", "--num-shards", "1"]


def _prepare_latin1_manifest(ws: Workspace) -> list[str]:
    return ["prepare", str(_manifest(ws, "latin-1", text="caf\xe9")), str(ws.out), "--workers", "1"]


def _holds_the_manifest_rows(ws: Workspace) -> None:
    import pyarrow.parquet as pq

    ids = sorted(i for shard in ws.out.rglob("*.parquet")
                 for i in pq.read_table(shard, columns=["id"])["id"].to_pylist())
    assert ids == [f"clips/c{i}" for i in range(len(MANIFEST_ROWS))], ids


def _predict_batch(ws: Workspace, encoding: str, text: str = "hello there", *extra: str) -> list[str]:
    _clip(ws.root / "clips" / "a.wav")
    (ws.root / "clips.csv").write_bytes(f"audio,text\nclips/a.wav,{text}\n".encode(encoding))
    return ["predict", str(ws.run / "best"), "--manifest", str(ws.root / "clips.csv"), *extra]


def _predict_loud_audio(ws: Workspace) -> list[str]:
    return ["predict", str(ws.run / "best"), "--audio", str(_clip(ws.root / "loud.wav", peak=1e30)), "--text", "hi"]


def _predict_with(damage: Callable[[Path], object]) -> Callable[[Workspace], list[str]]:
    """`emotrain predict` with the run's best/ damaged by `damage(best)`."""
    def probe(ws: Workspace) -> list[str]:
        damage(ws.run / "best")
        return ["predict", str(ws.run / "best"), "--audio", str(_clip(ws.root / "a.wav")), "--text", "hi"]
    return probe


def _evaluate_with(damage: Callable[[Path], object], *extra: str) -> Callable[[Workspace], list[str]]:
    """`emotrain evaluate` on session 1 with the run's best/ damaged by `damage(best)`."""
    def probe(ws: Workspace) -> list[str]:
        damage(ws.run / "best")
        return ["evaluate", str(ws.run / "best"), str(ws.corpus), "--session", "1", *extra]
    return probe


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _truncated_model(ws: Workspace, *extra: str) -> list[str]:
    _truncate(_step(ws, 4) / "model.safetensors")
    return _interrupted_run(ws, *extra)


def _optimizer_is_a_directory(ws: Workspace) -> list[str]:
    (_step(ws, 4) / "optimizer.bin").unlink()
    (_step(ws, 4) / "optimizer.bin").mkdir()
    return _interrupted_run(ws)


def _garbage_rng_state(ws: Workspace, *extra: str) -> list[str]:
    (_step(ws, 4) / "random_states_0.pkl").write_bytes(b"not a pickle at all")
    return _interrupted_run(ws, *extra)


class _TouchesAFile:
    """Pickled, it names `open(path, "w")`: loading it with weights_only=False would create `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _malicious_rng_state(ws: Workspace) -> list[str]:
    import torch

    torch.save({"random_state": _TouchesAFile(ws.root / "pwned")}, _step(ws, 4) / "random_states_0.pkl")
    _without_manifests(ws)  # so that only loading it can tell
    return _interrupted_run(ws)


def _added_rng_state(ws: Workspace) -> list[str]:
    """A file the save did not write, which a load might read (here another rank's RNG state)."""
    shutil.copy(_step(ws, 4) / "random_states_0.pkl", _step(ws, 4) / "random_states_1.pkl")
    return _interrupted_run(ws)


def _step_6_being_copied_in(ws: Workspace) -> list[str]:
    """A checkpoint folder copied in without its COMPLETE marker yet (or that a sync tool left without
    it); the run restarts from step 2, so it saves step 4 again and rotates."""
    shutil.copytree(_step(ws, 4), _step(ws, 6))
    (_step(ws, 6) / "COMPLETE").unlink()
    return _interrupted_run(ws, f"train.resume={_step(ws, 2)}")


def _resumed_from_step_2(ws: Workspace) -> None:
    from emotrain.train.checkpoint import checkpoint_problem, is_abandoned

    log = (ws.run / "train.log").read_text()
    assert f"resumed from {_step(ws, 2)} " in log and f"resumed from {_step(ws, 4)} " not in log
    assert (ws.run / "metrics.json").is_file()  # the run trained steps 3 and 4 again and finished
    # The damaged checkpoint, abandoned by the fallback, was replaced by a sound and current one.
    assert checkpoint_problem(_step(ws, 4)) is None and not is_abandoned(_step(ws, 4))
    assert not (ws.root / "pwned").exists()


def _step_6_left_alone(ws: Workspace) -> None:
    _resumed_from_step_2(ws)
    assert sorted(path.name for path in _step(ws, 6).iterdir()) == sorted(
        path.name for path in _step(ws, 4).iterdir() if path.name != "COMPLETE")


def _nothing_resumed(ws: Workspace) -> None:
    assert not (ws.run / "metrics.json").exists()
    assert not (ws.root / "pwned").exists()




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


def _evaluate_fp16_on_cpu(ws: Workspace) -> list[str]:
    return ["evaluate", str(ws.run / "best"), str(ws.corpus), "--mixed-precision", "fp16",
            "--out", str(ws.root / "evaluation.json")]


def _records_fp32(ws: Workspace) -> None:
    assert json.loads((ws.root / "evaluation.json").read_text())["mixed_precision"] == "no"


UNWRITABLE = Path("/sys/emotrain-probe-run")
"""An output_dir no user may create, root included (sysfs refuses mkdir: EPERM), so the row runs in
CI as root; as another user, the up-front check refuses it (`RunFolder.check_writable`). (A chmod-ed
folder does not stop root: tests/unit/test_cli_run_faults.py simulates a read-only output_dir.)"""


def _nothing_created_there(ws: Workspace) -> None:
    assert not UNWRITABLE.exists()


# --- secrets: URLs carrying credentials ------------------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


PROBES: list[Probe] = [
    # --- configs ------------------------------------------------------------------------------
    Probe("config-not-utf8", _non_utf8_config, ("latin1.yaml", "UTF-8")),
    # --- secrets ------------------------------------------------------------------------------
    Probe("secret-in-evaluate-data-dir",
          lambda ws: ["evaluate", str(ws.run / "best"), f"memory://b/prepared?sig={SECRET}"],
          ("emotrain evaluate: error: DATA_DIR: must not carry credentials", "query parameter sig"), absent=(SECRET,)),
    Probe("secret-in-prepare-source", lambda ws: ["prepare", f"memory://release?sig={SECRET}", str(ws.out)],
          ("emotrain prepare: error: SOURCE: must not carry credentials",), absent=(SECRET,), check=_no_output_folder),
    Probe("secret-in-train-resume", lambda ws: ws.train(f"train.resume=s3://b/ck?X-Amz-Signature={SECRET}"),
          ("train.resume: must not carry credentials", "X-Amz-Signature"), absent=(SECRET,), check=_no_output_folder),
    Probe("secret-in-config-resume", lambda ws: ["config", str(SMOKE), f"train.resume=s3://b/ck?sig={SECRET}"],
          ("train.resume: must not carry credentials",), absent=(SECRET,)),
    # --- data ---------------------------------------------------------------------------------
    Probe("data-shard-deleted-train", _after(_delete_shard, _train_briefly),
          ("session2 is missing data-00003-of-00008.parquet", "emotrain prepare"), check=_no_output_folder),
    Probe("data-shard-deleted-evaluate", _after(_delete_shard, _evaluate),
          ("session2 is missing data-00003-of-00008.parquet", "emotrain prepare")),
    Probe("data-shard-truncated-train", _after(_truncate_shard, _train_briefly),
          (SHARD, "damaged", "emotrain prepare"), check=_no_output_folder),
    Probe("data-shard-truncated-evaluate", _after(_truncate_shard, _evaluate),
          (SHARD, "damaged", "emotrain prepare")),
    Probe("data-shard-copied-over-another-group-evaluate", _after(_shard_copied_over_another_group, _evaluate),
          ("appear more than once", "session2/data-00000-of-00008.parquet and", "emotrain prepare")),
    Probe("data-shard-copy-beside-the-shards", _after(_copy_of_a_shard, _train_briefly),
          ("data-00000-of-00008 (1).parquet was not written by `emotrain prepare`", "remove it"),
          check=_no_output_folder),
    Probe("data-group-folder-removed", _after(_remove_a_group_folder, _train_briefly),
          ("session3 holds no shards", "dataset.json lists the group session3", "incomplete", "emotrain prepare"),
          check=_no_output_folder),
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
    Probe("checkpoint-truncated-model-auto", _truncated_model,
          ("checkpoint step-000004 is damaged (model.safetensors: 1000 bytes,", "resuming from step-000002 instead"),
          rc=0, check=_resumed_from_step_2),
    Probe("checkpoint-truncated-model-explicit",
          lambda ws: _truncated_model(ws, f"train.resume={_step(ws, 4)}"),
          ("train.resume=", "step-000004 is damaged (model.safetensors: 1000 bytes,", "train.resume=never"),
          rc=1, check=_nothing_resumed),
    Probe("checkpoint-optimizer-is-a-directory", _optimizer_is_a_directory,
          ("step-000004 is damaged (optimizer.bin: a directory in place of the file)", "resuming from step-000002"),
          rc=0, check=_resumed_from_step_2),
    Probe("checkpoint-missing-file-explicit",
          lambda ws: (_step(ws, 4) / "optimizer.bin").unlink() or _interrupted_run(ws, f"train.resume={_step(ws, 4)}"),
          ("step-000004 is damaged (optimizer.bin: missing)",), rc=1, check=_nothing_resumed),
    Probe("checkpoint-garbage-rng-state-auto", _garbage_rng_state,
          ("step-000004 is damaged (random_states_0.pkl:", "resuming from step-000002"),
          rc=0, check=_resumed_from_step_2),
    Probe("checkpoint-garbage-rng-state-no-manifest-explicit",
          lambda ws: _without_manifests(ws) or _garbage_rng_state(ws, f"train.resume={_step(ws, 4)}"),
          ("step-000004 is damaged (random_states_0.pkl does not load (UnpicklingError",),
          rc=1, check=_nothing_resumed),
    Probe("checkpoint-malicious-rng-state-no-manifest-auto", _malicious_rng_state,
          ("step-000004 is damaged (random_states_0.pkl does not load", "io.open", "resuming from step-000002"),
          rc=0, check=_resumed_from_step_2),
    Probe("checkpoint-added-file-auto", _added_rng_state,
          ("step-000004 is damaged (random_states_1.pkl: not in the manifest written at save)",
           "resuming from step-000002"), rc=0, check=_resumed_from_step_2),
    Probe("checkpoint-step-folder-without-marker-left-alone", _step_6_being_copied_in,
          ("step-000006 is not a complete checkpoint (no COMPLETE marker): ignored",), rc=0, check=_step_6_left_alone),
    Probe("checkpoint-truncated-model-no-manifest-explicit",
          lambda ws: _without_manifests(ws) or _truncated_model(ws, f"train.resume={_step(ws, 4)}"),
          ("cannot load checkpoint", "step-000004", "SafetensorError"), rc=1, check=_nothing_resumed),

    # --- runs: planning, stopping, finished runs, disk ------------------------------------------
    Probe("max-epochs-huge-max-steps-small", _huge_max_epochs, ("training stopped: max_steps after 1 steps",), rc=0),
    Probe("finished-run-rerun", _rerun_finished, ("holds this run, finished", "metrics.json", "nothing to do"), rc=0,
          check=_finished_run_untouched),
    pytest.param(Probe("fp16-without-cuda", _fp16_on_cpu, ("mixed_precision=fp16", "training in fp32"), rc=0,
                       check=_says_fp32_not_fp16),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU"),
                 id="fp16-without-cuda"),
    pytest.param(Probe("evaluate-fp16-without-cuda", _evaluate_fp16_on_cpu,
                       ("--mixed-precision asks for fp16", "needs a CUDA GPU", "evaluating in fp32"), rc=0,
                       check=_records_fp32),
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU"),
                 id="evaluate-fp16-without-cuda"),
    Probe("output-dir-not-permitted", lambda ws: ws.train(output_dir=UNWRITABLE), (str(UNWRITABLE), "choose another"),
          check=_nothing_created_there),

    # --- predict / evaluate -------------------------------------------------------------------
    Probe("predict-audio-1e30", _predict_loud_audio, ("loud.wav", "non-finite features"), rc=1),
    Probe("prepare-manifest-bom", _prepare_bom_manifest, (), rc=0, check=_holds_the_manifest_rows),
    Probe("prepare-manifest-latin1", _prepare_latin1_manifest, ("meta.csv", "not UTF-8")),
    Probe("predict-batch-bom", lambda ws: _predict_batch(ws, "utf-8-sig"), ("1 of 1 row(s) predicted", "0 failed"),
          rc=0),
    Probe("predict-batch-latin1", lambda ws: _predict_batch(ws, "latin-1", "caf\xe9"), ("clips.csv", "not UTF-8")),
    Probe("predict-batch-size-negative", lambda ws: _predict_batch(ws, "utf-8", "hi", "--batch-size", "-3"),
          ("--batch-size -3",)),
    Probe("predict-device-absent", lambda ws: _predict_batch(ws, "utf-8", "hi", "--device", "cuda:99"),
          ("--device cuda:99",)),
    Probe("predict-model-weights-truncated", _predict_with(lambda best: _truncate(best / "model.safetensors")),
          ("best", "model.safetensors", "damaged")),
    Probe("predict-model-no-tokenizer", _predict_with(lambda best: (best / "tokenizer_config.json").unlink()),
          ("best", "no tokenizer_config.json")),
    Probe("evaluate-model-config-not-json", _evaluate_with(lambda best: (best / "emotion_model.json").write_text("{")),
          ("best", "JSONDecodeError", "damaged")),
    Probe("evaluate-run-config-not-yaml", _evaluate_with(lambda best: (best / "config.yaml").write_text("data: [")),
          ("config.yaml", "damaged")),
    Probe("evaluate-out-is-a-folder", _evaluate_with(lambda best: None, "--out", "."), ("--out", "is a folder")),
    Probe("evaluate-session-0", lambda ws: ["evaluate", str(ws.run / "best"), str(ws.corpus), "--session", "0"],
          ("no group [0]",)),
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
    for text in probe.absent:
        assert text not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    if probe.rc != 0:
        assert lines and lines[-1].startswith("emotrain"), proc.stderr[-4000:]
        candidates = lines[-1:]
    else:
        candidates = lines
    if probe.expect or probe.rc != 0:  # a success may say nothing on stderr: its `check` says what must hold
        assert any(all(text in line for text in probe.expect) for line in candidates), (probe.expect,
                                                                                        proc.stderr[-4000:])
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
