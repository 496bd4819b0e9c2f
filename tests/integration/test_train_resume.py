"""Preemption and resume: a run killed mid-epoch and rerun with the same command ends exactly where an
uninterrupted run ends, and its (offline) W&B history continues the same run without a gap."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from emotrain.train.checkpoint import complete_checkpoints
from emotrain.train.preemption import EXIT_PREEMPTED
from tests.integration.conftest import EMOTRAIN, REPO, run_train, subprocess_env, tiny_overrides
from tests.wandb_offline import run_history

pytestmark = pytest.mark.slow

COMMON = (
    "train.max_epochs=4",
    "train.checkpoint_every_steps=10",
    "train.early_stopping_patience=0",
    "logging.log_every_steps=5",
    "logging.report_to=[wandb]",
)


def _logged_step(log_text: str) -> int:
    steps = [int(m) for m in re.findall(r"INFO step (\d+) epoch", log_text)]
    return max(steps, default=0)


def _kill_when_past(overrides: list[str], log_file, step: int, timeout: float = 300) -> tuple[int, str]:
    """Start a run, send SIGTERM once its log shows `step`, return (exit code, output)."""
    proc = subprocess.Popen(
        [*EMOTRAIN, "train", str(REPO / "configs" / "smoke.yaml"), *overrides],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if log_file.exists() and _logged_step(log_file.read_text()) >= step:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, output


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_sigterm_mid_epoch_then_rerun_matches_an_uninterrupted_run(synthetic_corpus, tmp_path):
    reference = run_train(tiny_overrides(synthetic_corpus, tmp_path / "reference", *COMMON))
    assert reference.returncode == 0, reference.stderr[-4000:]
    reference_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    total_steps = reference_metrics["steps"]
    assert total_steps > 60

    out = tmp_path / "interrupted"
    overrides = tiny_overrides(synthetic_corpus, out, *COMMON)
    code, output = _kill_when_past(overrides, out / "train.log", step=35)
    assert code == EXIT_PREEMPTED, output[-4000:]
    assert "stop requested (signal SIGTERM)" in output
    saved = [step for step, _ in complete_checkpoints(out / "checkpoints")]
    stopped_at = max(saved)
    assert 35 <= stopped_at < total_steps, (saved, total_steps)  # mid-run, saved at the step boundary
    assert not (out / "metrics.json").exists()

    # A save that was killed mid-write leaves folders that resume=auto must never pick.
    truncated = out / "checkpoints" / "step-999999"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes(b"\x00" * 10)
    partial = out / "checkpoints" / ".partial-step-001000"
    partial.mkdir()

    rerun = run_train(overrides)  # the very same command
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped_at:06d}'}" in rerun.stderr + rerun.stdout

    # Same model and the same metrics as the run that was never interrupted.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == reference_metrics
    expected, got = _weights(tmp_path / "reference" / "best"), _weights(out / "best")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    # W&B (offline): one run id across both processes' folders, and every logged step once at least.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    histories = [run_history(run) for run in runs]
    assert len({run_id for run_id, _ in histories}) == 1
    logged = {row["train/step"] for _, rows in histories for row in rows if "train/loss" in row}
    assert logged == set(range(5, total_steps + 1, 5)), sorted(logged)
    validation_steps = {row["train/step"] for _, rows in histories for row in rows if "validation/ua" in row}
    assert metrics["best_step"] in validation_steps
    assert any("test/ua" in row for _, rows in histories for row in rows)
