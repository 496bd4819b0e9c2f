"""`emotrain cv` through the real CLI, with a stand-in for the training (tests/fake_train.py): the
comparison table of several variants, failed runs, stop requests passed on, the run-folder lock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emotrain.train.run_folder import RunFolderBusy, RunFolderLock, wait_until_free
from tests.toyset import write_toy_prepared

REPO = Path(__file__).resolve().parents[2]
FAKE = f"{sys.executable} {REPO / 'tests' / 'fake_train.py'}"


def _cv(tmp_path: Path, *args: str, env: dict | None = None, wait: bool = True, data: Path | None = None):
    # cv checks that the data is prepared before it starts; the stand-in trainer reads its metadata only.
    if data is None:
        data = tmp_path / "prepared"
        if not data.is_dir():
            write_toy_prepared(data, per_session=4, num_shards=1)
    command = [sys.executable, "-m", "emotrain.cli", "cv", str(REPO / "configs" / "smoke.yaml"), f"data.path={data}",
               f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}", "--launcher", FAKE, *args]
    environment = {**os.environ, "FAKE_TRAIN_LOG": str(tmp_path / "calls.log"), **(env or {})}
    if wait:
        return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=120)
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_variants_make_one_experiment_each_and_one_side_by_side_table(tmp_path):
    proc = _cv(tmp_path, "--folds", "1,2", "--variants", "fusion,audio,text")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"{e} {f} 42 group=smoke" for e in ("smoke", "smoke-audio", "smoke-text") for f in (1, 2)]
    lines = proc.stdout.splitlines()
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| smoke")}
    assert list(rows) == ["smoke", "smoke-audio", "smoke-text"]
    assert "| smoke-audio | audio | 2/2 | 51.5 ± 0.7 | 51.5 ± 0.7 |" in rows["smoke-audio"]
    assert rows["smoke-audio"].endswith("| -30.0 ± 0.0 | 0/2 | -30.0 ± 0.0 | 0/2 |")  # Δ UA and Δ WA, paired
    assert rows["smoke-text"].endswith("| -20.0 ± 0.0 | 0/2 | -20.0 ± 0.0 | 0/2 |")
    for name in ("smoke", "smoke-audio", "smoke-text"):
        assert json.loads((tmp_path / name / "cv.json").read_text())["folds"] == [1, 2]
    assert (tmp_path / "smoke" / "report" / "report.md").is_file()
    # The same command again trains nothing and writes the same table.
    again = _cv(tmp_path, "--folds", "1,2", "--variants", "fusion,audio,text")
    assert again.returncode == 0 and len((tmp_path / "calls.log").read_text().splitlines()) == 6
    assert again.stdout.count("finished, skipped") == 6


def test_a_failed_run_does_not_stop_the_others_and_sets_the_exit_code(tmp_path):
    proc = _cv(tmp_path, "--folds", "1,2,3", env={"FAKE_TRAIN_FAIL": "smoke:2"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[cv 2/3] smoke fold 2 seed 42: FAILED with exit code 3" in proc.stdout
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 3  # fold 3 still ran
    assert "| smoke | fusion | 2/3 |" in proc.stdout and "smoke: fold 2 is unfinished" in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_stop_request_reaches_the_training_and_cv_exits_75(tmp_path, sig):
    process = _cv(tmp_path, "--folds", "1,2", env={"FAKE_TRAIN_WAIT": "1"}, wait=False)
    deadline = time.time() + 60
    while not (tmp_path / "smoke" / "fold1" / "waiting").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "smoke" / "fold1" / "waiting").exists(), process.communicate(timeout=10)
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 75, out + err
    assert (tmp_path / "smoke" / "fold1" / "got-sigterm").read_text() == "saved"  # passed on as SIGTERM
    assert "stopped (exit 75); rerun the same command to continue" in out
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1  # fold 2 never started


def test_one_training_per_run_folder(tmp_path):
    first = RunFolderLock(tmp_path)
    assert first.acquire() is True
    assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    with pytest.raises(RunFolderBusy, match=r"output_dir: .* is being written by a training still running \(pid "):
        RunFolderLock(tmp_path).acquire()
    # wait_until_free blocks until the holder lets go (here: a process that holds it for a moment).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from emotrain.train.run_folder import RunFolderLock; "
        "lock = RunFolderLock(sys.argv[2]); lock.acquire(); print('held', flush=True); time.sleep(1.5)"),
        str(REPO), str(tmp_path / "other")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    first.release()
    said, started = [], time.perf_counter()
    wait_until_free(tmp_path / "other", say=said.append)
    assert time.perf_counter() - started > 0.5 and said and "waiting for it to end" in said[0]
    assert holder.wait(timeout=10) == 0
    RunFolderLock(tmp_path / "other").acquire()  # free again


def test_read_manifest_reports_malformed_rows_and_resolves_paths(tmp_path):
    from emotrain.predict import InputError, read_manifest

    (tmp_path / "a.csv").write_text('id,audio,text\nu1,clips/x.wav,"hello, there"\nu2,/abs/y.wav\nu3,z.wav,hi,extra\nu4,,hi\n')
    rows = list(read_manifest(tmp_path / "a.csv"))
    assert rows[0] == {"row": 1, "id": "u1", "audio": str(tmp_path / "clips" / "x.wav"), "text": "hello, there"}
    assert rows[1]["error"].startswith("malformed row: 3 columns expected")  # too few fields
    assert rows[2]["error"].startswith("malformed row: 3 columns expected")  # too many
    assert rows[3] == {"row": 4, "id": "u4", "error": "malformed row: no `audio` path"}
    (tmp_path / "b.jsonl").write_text('{"audio": "x.wav"}\n\n{not json}\n[1, 2]\n{"audio": 3}\n')
    rows = list(read_manifest(tmp_path / "b.jsonl"))
    assert [r["row"] for r in rows] == [1, 3, 4, 5]
    assert rows[0]["audio"] == str(tmp_path / "x.wav") and rows[0]["text"] is None
    assert rows[1]["error"].startswith("malformed row: not JSON")
    assert rows[2]["error"].startswith("malformed row: expected an object")
    assert rows[3]["error"] == "malformed row: no `audio` path"
    (tmp_path / "c.csv").write_text("path,text\nx.wav,hi\n")
    with pytest.raises(InputError, match="needs an `audio` column"):
        list(read_manifest(tmp_path / "c.csv"))


def test_a_finished_run_trained_on_other_data_is_refused_not_counted(tmp_path):
    """`data.path` is result-neutral (the same data, moved), so comparing configs let a fold finished on
    another corpus count in the table: the data it trained on is compared instead."""
    assert _cv(tmp_path, "--folds", "1").returncode == 0
    other = write_toy_prepared(tmp_path / "other", per_session=5, num_shards=1, seed=1)
    proc = _cv(tmp_path, "--folds", "1", data=other)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "finished, skipped" not in proc.stdout and "| smoke |" not in proc.stdout
    message = proc.stderr.strip().splitlines()[-1]
    assert (f"{tmp_path}/smoke/fold1 holds a run trained on other data ({tmp_path}/prepared) than "
            f"data.path={other}") in message
    assert "delete" in message and "give its data" in message
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1  # nothing trained either
    # The same data elsewhere is the same run.
    shutil.copytree(tmp_path / "prepared", tmp_path / "moved")
    moved = _cv(tmp_path, "--folds", "1", data=tmp_path / "moved")
    assert moved.returncode == 0 and "smoke fold 1 seed 42: finished, skipped" in moved.stdout, moved.stderr
