"""Faults around a run, through `emotrain.cli.main` in process (simulated where a test cannot cause them).

A full disk, a read-only or forbidden path give one line `emotrain <verb>: error: <file>: <reason>
(<what to do>)`, no traceback, exit 1 (a full disk: the run failed, the same command continues it)
or 2 (a path that cannot be written or read). A stop request after setup and before the first step
ends the run with nothing saved.

Root writes into a `chmod`-ed folder, and a full disk cannot be made in a test: both are simulated
(the probe table, tests/integration/test_bad_input.py, has the chmod row for other users)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import emotrain.cli as cli

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from emotrain.data.prepare import prepare
    from emotrain.data.synth import synthesize_release

    root = tmp_path_factory.mktemp("storage")
    synthesize_release(root / "release", seed=1, utterances_per_session=12, duration_scale=0.3)
    prepare(root / "release", root / "prepared", workers=1)
    return root / "prepared"


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
