"""Faults around a run, through `emotrain.cli.main` in process (simulated where a test cannot cause them).

A full disk, a read-only or forbidden path give one line `emotrain <verb>: error: <file>: <reason>
(<what to do>)`, no traceback, exit 1 (a full disk: the run failed, the same command continues it)
or 2 (a path that cannot be written or read). A stop request after setup and before the first step
ends the run with nothing saved.

Root writes into a `chmod`-ed folder, and a full disk cannot be made in a test: both are simulated
(the probe table, tests/integration/test_bad_input.py, has a row with an output_dir under /sys, where
no user may create a folder)."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

import emotrain.cli as cli
from tests.integration.conftest import prepared_synthetic_corpus

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepared_synthetic_corpus(tmp_path_factory.mktemp("storage"), 12)


def _train_argv(corpus: Path, out: Path) -> list[str]:
    return ["train", str(SMOKE), f"data.path={corpus}", f"output_dir={out}", "model.text_encoder=tiny",
            "model.hidden_size=32", "model.classifier_hidden_size=32", "logging.progress_bar=false"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_disk_full_at_start_is_one_line_saying_the_run_resumes(corpus, tmp_path, monkeypatch, capsys):
    import emotrain.train.recipe as recipe

    def full(cfg, path, **kwargs):  # the first file a run writes in full: its config.yaml
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(recipe, "save_config", full)
    out = tmp_path / "out"
    assert cli.main(_train_argv(corpus, out)) == 1
    line = _one_line(capsys)
    assert line.startswith(f"emotrain train: error: {out / 'config.yaml'}: No space left on device (")
    assert "resumes from its last complete checkpoint" in line


def test_a_read_only_output_dir_is_refused_before_anything_is_built(corpus, tmp_path, monkeypatch, capsys):
    import emotrain.train.recipe as recipe

    parent = tmp_path / "archive"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and real_access(path, mode, **kw))
    monkeypatch.setattr(recipe, "_build_training", lambda *a: pytest.fail("setup went on"))
    assert cli.main(_train_argv(corpus, parent / "out")) == 2
    line = _one_line(capsys)
    assert line.startswith("emotrain: config error: output_dir: ") and str(parent / "out") in line
    assert "read-only" in line and "choose another output_dir" in line
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("code,status,todo", [
    (errno.ENOSPC, 1, "free space"), (errno.EDQUOT, 1, "quota"), (errno.EROFS, 2, "read-only"),
    (errno.EACCES, 2, "permissions"), (errno.EPERM, 2, "permissions"),
])
def test_a_storage_error_escaping_any_verb_is_one_line_keeping_its_reason(monkeypatch, capsys, code, status, todo):
    # The checkpoint writer's own sentence (how much space a checkpoint needs) is printed as it is.
    reason = "the checkpoint needs 174.2 MB and 12.0 MB are free"

    def fails(args):
        raise OSError(code, reason, "/runs/x/checkpoints/step-000200")

    monkeypatch.setattr(cli, "cmd_config", fails)
    assert cli.main(["config", str(SMOKE)]) == status
    line = _one_line(capsys)
    assert line.startswith(f"emotrain config: error: /runs/x/checkpoints/step-000200: {reason} (")
    assert todo in line


def test_other_os_errors_are_not_disguised(monkeypatch):
    def fails(args):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(cli, "cmd_config", fails)
    with pytest.raises(ConnectionResetError):
        cli.main(["config", str(SMOKE)])


def test_a_stop_request_between_setup_and_the_first_step_saves_nothing(corpus, tmp_path, capsys):
    # (A signal during setup raises at once: tests/integration/test_bad_input.py. This is the flag
    # file, or a signal, arriving after setup: every rank agrees on it before the first step.)
    out = tmp_path / "out"
    code = cli.main(_train_argv(corpus, out), wrap_training=lambda training: training.watcher.request("the test"))
    assert code == 75
    err = capsys.readouterr().err
    assert "stop requested (the test) before the first step: nothing to save, exiting with 75" in err, err[-3000:]
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_a_stop_signal_while_train_checks_its_config_and_loads_torch_ends_it_at_once(corpus, tmp_path, monkeypatch,
                                                                                      caplog, capsys):
    import signal

    real_load = cli.load_config

    def load_then_signal(*args, **kwargs):  # SIGTERM arrives while `emotrain train` starts up
        cfg = real_load(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return cfg

    def unwatched(signum, frame):  # what would kill an `emotrain train` that does not watch yet
        pytest.fail("SIGTERM reached no watcher of emotrain's")

    monkeypatch.setattr(cli, "load_config", load_then_signal)
    previous = signal.signal(signal.SIGTERM, unwatched)
    try:
        out = tmp_path / "out"
        assert cli.main(_train_argv(corpus, out)) == 75
        # (Before the run's logging is set up the line goes to the root handlers: stderr in a
        # terminal, pytest's capture here.)
        said = caplog.text + capsys.readouterr().err
        assert "stop requested (signal SIGTERM) before the first step" in said, said
        assert not out.exists()
        assert signal.getsignal(signal.SIGTERM) is unwatched  # the handler before it is given back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_log_file_the_disk_cannot_take_is_said_once_and_the_console_keeps_every_line(tmp_path, capsys):
    import logging

    from emotrain.train.tracking import setup_logging

    log = setup_logging(tmp_path, is_main_process=True)
    file_handler = next(h for h in log.handlers if isinstance(h, logging.FileHandler))

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    file_handler.stream = FullDisk()
    try:
        for i in range(3):
            log.info("line %d", i)
    finally:
        file_handler.stream = None
        log.handlers.clear()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert err.count("cannot write") == 1 and "No space left on device" in err
    assert all(f"line {i}" in err for i in range(3))


# --- finished runs: what "finished" means whatever the fold, and train.resume on one ---------------

def _finish(corpus: Path, out: Path, *extra: str) -> None:
    assert cli.main([*_train_argv(corpus, out), "train.max_steps=2", "train.checkpoint_every_steps=1", *extra]) == 0


def _snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(out.rglob("*")) if p.name != ".lock"}


def test_a_finished_fold_0_run_is_done_when_rerun(corpus, tmp_path, capsys):
    # Fold 0 trains on everything: no test set, no test metrics; it is finished all the same.
    out = tmp_path / "out"
    _finish(corpus, out, "data.fold=0")
    assert "test" not in json.loads((out / "metrics.json").read_text())
    # Finished: its checkpoints are gone (train.keep_checkpoints_after_finish=false), best/ and the results stay.
    assert "its checkpoints are deleted" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and (out / "best" / "model.safetensors").is_file()
    before = _snapshot(out)
    capsys.readouterr()
    assert cli.main([*_train_argv(corpus, out), "train.max_steps=2", "train.checkpoint_every_steps=1",
                     "data.fold=0"]) == 0
    err = capsys.readouterr().err
    assert "holds this run, finished" in err and "nothing to do" in err, err[-3000:]
    assert _snapshot(out) == before  # not resumed: best/, metrics.json and history.jsonl as they were


def test_train_resume_never_or_a_checkpoint_on_a_finished_run_does_what_it_says(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    _finish(corpus, out, "train.keep_checkpoints_after_finish=true")
    finished = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    # An explicit checkpoint: the run restarts from it (its step 2 again) and finishes anew.
    step1 = out / "checkpoints" / "step-000001"
    assert cli.main([*_train_argv(corpus, out), "train.max_steps=2", "train.checkpoint_every_steps=1",
                     f"train.resume={step1}"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" not in err and f"resumed from {step1} (epoch 0, step 1)" in err, err[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == finished["steps"] == 2
    # never: it starts afresh (the old checkpoints abandoned) and finishes anew.
    written = (out / "metrics.json").stat().st_mtime_ns
    assert cli.main([*_train_argv(corpus, out), "train.max_steps=2", "train.checkpoint_every_steps=1",
                     "train.resume=never"]) == 0
    err = capsys.readouterr().err
    assert "nothing to do" not in err and "starting fresh" in err, err[-3000:]
    assert (out / "metrics.json").stat().st_mtime_ns != written


def test_a_finished_run_restarted_is_not_finished_until_the_restart_is(corpus, tmp_path, monkeypatch, capsys):
    """Its old metrics.json goes when the restart begins: stopped before its end, the folder is an
    unfinished run (cv and report do not count it, the plain rerun continues it, not "nothing to do")."""
    import emotrain.train.recipe as recipe
    from emotrain.train.run_folder import RunFolder

    out = tmp_path / "out"
    _finish(corpus, out)
    stopped = []
    real_fit = recipe.fit
    monkeypatch.setattr(recipe, "fit", lambda t: stopped.append(t.state.progress.step) or 75)  # preempted
    argv = [*_train_argv(corpus, out), "train.max_steps=2", "train.checkpoint_every_steps=1"]
    assert cli.main([*argv, "train.resume=never"]) == 75 and stopped == [0]
    assert "restarts a finished run (train.resume=never)" in capsys.readouterr().err
    assert not (out / "metrics.json").exists() and not RunFolder(out).is_finished()
    monkeypatch.setattr(recipe, "fit", real_fit)
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "nothing to do" not in err and "starting fresh" in err, err[-3000:]
    assert RunFolder(out).is_finished()


# --- a stop-flag file: fresh (touched since the run started) stops it, stale is removed -------------

def test_a_flag_touched_during_setup_stops_the_run_before_its_first_step(corpus, tmp_path, monkeypatch, capsys):
    # What Slurm's USR1 trap does while the run starts up: the flag must not be taken for a stale one.
    import emotrain.train.recipe as recipe

    out, flag = tmp_path / "out", tmp_path / ".emotrain-stop-123"
    monkeypatch.setenv("EMOTRAIN_STOP_FILE", str(flag))  # as slurm/train.sbatch sets it
    real_check = recipe.check_config_fits_dataset

    def check_then_touch(*args, **kwargs):  # setup has begun; the stale-flag clean-up is still to come
        flag.touch()
        return real_check(*args, **kwargs)

    monkeypatch.setattr(recipe, "check_config_fits_dataset", check_then_touch)
    monkeypatch.setattr(recipe, "build_model", lambda *a, **kw: pytest.fail("setup went on to build the model"))
    assert cli.main(_train_argv(corpus, out)) == 75
    said = capsys.readouterr().err
    assert f"stop requested (flag file {flag}) before the first step" in said, said[-3000:]
    assert not (out / "checkpoints").exists() and flag.exists()  # (the Slurm script removes it when the job ends)


def test_a_stale_flag_is_removed_and_does_not_stop_the_run(corpus, tmp_path, monkeypatch):
    import emotrain.train.recipe as recipe

    out = tmp_path / "out"
    out.mkdir()
    flag = out / "STOP"
    flag.touch()
    an_hour_ago = time.time() - 3600  # an earlier run's stop request, already served
    os.utime(flag, (an_hour_ago, an_hour_ago))
    counted = []
    real_steps_ahead = recipe.steps_ahead

    def counting(*args, **kwargs):
        counted.append(1)
        return real_steps_ahead(*args, **kwargs)

    monkeypatch.setattr(recipe, "steps_ahead", counting)
    assert cli.main([*_train_argv(corpus, out), "train.max_steps=1"]) == 0
    assert not flag.exists() and (out / "metrics.json").is_file()
    assert len(counted) == 1  # the run's steps are counted once (the log's and the progress bar's)


# --- evaluate: fp16 needs CUDA, as in training ------------------------------------------------------

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 runs on a GPU")
@pytest.mark.parametrize("asked", [["--mixed-precision", "fp16"], []])
def test_evaluate_in_fp16_without_cuda_says_so_and_records_fp32(corpus, tmp_path, capsys, asked):
    out = tmp_path / "out"
    _finish(corpus, out, "train.max_steps=1", "train.mixed_precision=fp16")  # the run's default: fp16
    capsys.readouterr()
    assert cli.main(["evaluate", str(out / "best"), str(corpus), *asked]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert results["mixed_precision"] == "no", results["mixed_precision"]
    notes = [line for line in captured.err.splitlines() if "needs a CUDA GPU" in line]
    assert len(notes) == 1 and "evaluating in fp32" in notes[0], captured.err[-3000:]
    assert ("--mixed-precision asks for fp16" if asked else "the run's train.mixed_precision") in notes[0]
