"""Preemption and resume: a run killed mid-epoch and rerun with the same command ends exactly where an
uninterrupted run ends, and its (offline) W&B history continues the same run without a gap."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from emotrain.train.checkpoint import complete_checkpoints
from emotrain.train.preemption import EXIT_PREEMPTED
from tests.integration.conftest import (
    EMOTRAIN,
    REPO,
    assert_loss_denominators,
    read_probe,
    read_probe_losses,
    run_probe,
    run_train,
    subprocess_env,
    tiny_overrides,
    validations,
)
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
    logged = {row["train/step"]: row["train/loss"] for _, rows in histories for row in rows if "train/loss" in row}
    assert set(logged) == set(range(5, total_steps + 1, 5)), sorted(logged)
    # ... with the same values: the log window the stop cut through was carried over.
    (reference_run,) = sorted((tmp_path / "reference" / "wandb").glob("offline-run-*"))
    expected = {row["train/step"]: row["train/loss"] for row in run_history(reference_run)[1] if "train/loss" in row}
    assert logged == expected
    validation_steps = {row["train/step"] for _, rows in histories for row in rows if "eval/ua" in row}
    assert metrics["best_step"] in validation_steps
    assert any("test/ua" in row for _, rows in histories for row in rows)


# ---------------------------------------------------------------------------------------------
# Exact resume at every kind of step: accumulation 2, 2 data workers, evaluation every 3 steps,
# early stopping active. A stop request arrives exactly at a chosen step (the probe), the same
# command is run again, and everything must equal the uninterrupted run.

BUSY = (
    "train.max_epochs=3",
    "train.gradient_accumulation_steps=2",
    "data.num_workers=2",
    "train.eval_every_steps=3",
    "train.early_stopping_patience=5",
    "train.checkpoint_every_steps=0",
    "train.keep_last_checkpoints=1",
    "logging.log_every_steps=4",  # the stops below fall inside a log window: it must survive them
    "logging.report_to=[wandb]",
)
TIMING_KEYS = ("train/utterances_per_second", "train/audio_seconds_per_second")


def _history(out) -> dict[tuple[int, str], object]:
    """{(train/step, key): value} over every offline W&B run of `out`, timing figures left out."""
    merged: dict[tuple[int, str], object] = {}
    for run in sorted((out / "wandb").glob("offline-run-*")):
        for row in run_history(run)[1]:
            for key, value in row.items():
                if key in TIMING_KEYS or key.startswith("perf/") or key == "train/step" or key.startswith("_"):
                    continue
                if "/confusion_table/" in key:  # the confusion chart's table: its file names and ids are the process's own
                    key, value = key.split("/confusion_table/")[0] + "/confusion", "table"
                assert (row["train/step"], key) not in merged or merged[(row["train/step"], key)] == value
                merged[(row["train/step"], key)] = value
    return merged


def _local_history(out) -> list[dict]:
    """The run folder's history.jsonl merged per step (what `emotrain report` plots), timing left out."""
    from emotrain.train.tracking import HISTORY_FILE, read_history

    return [{k: v for k, v in row.items() if k not in TIMING_KEYS and not k.startswith("perf/")}
            for row in read_history(out / HISTORY_FILE)]


def _trained(probe_dir) -> list[tuple[int, int, tuple[str, ...]]]:
    (records,) = read_probe(probe_dir).values()  # one process
    return [(r["epoch"], r["position"], tuple(r["ids"])) for r in records]


@pytest.fixture(scope="module")
def busy_reference(synthetic_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("busy")
    out = root / "reference"
    proc = run_probe(tiny_overrides(synthetic_corpus, out, *BUSY), EMOTRAIN_PROBE_DIR=str(root / "probe"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps_in_epoch0 = int(re.search(r"optimizer steps \((\d+) in this epoch", proc.stderr).group(1))
    return out, root / "probe", proc.stderr, steps_in_epoch0


def test_busy_reference_run_accumulates_evaluates_once_per_step_and_stops_early_by_its_rule(busy_reference,
                                                                                          fold1_sizes):
    out, probe, log, steps_in_epoch0 = busy_reference
    metrics = json.loads((out / "metrics.json").read_text())
    trained = _trained(probe)
    # Accumulation 2: two micro-batches per step, the epoch an exact number of steps.
    epoch0 = [t for t in trained if t[0] == 0]
    assert len(epoch0) == 2 * steps_in_epoch0 and steps_in_epoch0 >= 9
    # Each micro-batch's loss was scaled by its step's utterance count (both micro-batches, from the plan).
    assert_loss_denominators(probe, accumulation=2)
    # Each utterance once per epoch (the plan evens ranks out; nothing is dropped at the epoch end).
    for epoch in {t[0] for t in trained}:
        ids = [i for t in trained if t[0] == epoch for i in t[2]]
        if epoch < max(t[0] for t in trained) or metrics["stop_reason"] == "max_epochs":
            assert len(ids) == len(set(ids)) == fold1_sizes["num_train"]
    # Validation every 3 steps and at every epoch end, each step at most once.
    steps = [s for s, _ in validations(log)]
    assert len(steps) == len(set(steps)), steps
    assert {3, 6, steps_in_epoch0} <= set(steps)
    # Early stopping by its rule, replayed from the full-precision validation UAs in W&B.
    history = _history(out)
    uas = sorted((s, v) for (s, k), v in history.items() if k == "eval/ua")
    best, waited, expected = -1.0, 0, ("max_epochs", max(s for s, _ in uas))
    for step, ua in uas:
        if ua > best:
            best, waited = ua, 0
        else:
            waited += 1
        if waited >= 5:
            expected = ("early_stopping", step)
            break
    assert (metrics["stop_reason"], metrics["steps"]) == expected, (metrics["stop_reason"], metrics["steps"], uas)
    top = max(ua for _, ua in uas)
    assert metrics["best_step"] == min(s for s, ua in uas if ua == top)  # the first to reach the best UA
    assert metrics["steps"] > steps_in_epoch0 + 1, "the stops below must happen before training ends"


@pytest.mark.parametrize("where", ["evaluation step", "epoch end"])
def test_stop_at_an_evaluation_step_or_an_epoch_end_then_rerun_equals_the_uninterrupted_run(
    synthetic_corpus, tmp_path, busy_reference, where
):
    ref_out, ref_probe, ref_log, steps_in_epoch0 = busy_reference
    stop_at = 6 if where == "evaluation step" else steps_in_epoch0
    assert stop_at != steps_in_epoch0 or where == "epoch end"
    out, probe = tmp_path / "run", tmp_path / "probe"
    overrides = tiny_overrides(synthetic_corpus, out, *BUSY)

    first = run_probe(overrides, EMOTRAIN_PROBE_DIR=str(probe), EMOTRAIN_PROBE_STOP_AT_STEP=str(stop_at))
    assert first.returncode == EXIT_PREEMPTED, first.stderr[-4000:]
    assert f"saving step {stop_at} and exiting with 75 (its validation runs first on resume)" in first.stderr
    assert stop_at not in [s for s, _ in validations(first.stderr)]  # saved before validating
    saved = json.loads((out / "checkpoints" / f"step-{stop_at:06d}" / "loop_state.json").read_text())
    assert saved["pending_evaluation"] is True and saved["epoch"] == (1 if where == "epoch end" else 0)

    rerun = run_probe(overrides, EMOTRAIN_PROBE_DIR=str(probe))
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert [s for s, _ in validations(rerun.stderr)][0] == stop_at  # the deferred validation, first

    # Everything equals the uninterrupted run: metrics (best step included), weights, W&B history,
    # and the exact batches trained, each once.
    assert json.loads((out / "metrics.json").read_text()) == json.loads((ref_out / "metrics.json").read_text())
    expected, got = _weights(ref_out / "best"), _weights(out / "best")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert _history(out) == _history(ref_out)
    assert _local_history(out) == _local_history(ref_out)  # the run folder's own history.jsonl too
    assert _trained(probe) == _trained(ref_probe)
    assert validations(first.stderr + rerun.stderr) == validations(ref_log)


def test_max_steps_with_class_weights_and_label_smoothing(synthetic_corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_probe(tiny_overrides(synthetic_corpus, out, "train.max_steps=5", "train.max_epochs=3",
                                    "train.class_weights=balanced", "train.label_smoothing=0.1",
                                    "train.warmup_ratio=0.4", "train.checkpoint_every_steps=0",
                                    "logging.log_every_steps=1", "train.keep_checkpoints_after_finish=true"),
                     EMOTRAIN_PROBE_DIR=str(tmp_path / "probe"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The loss got the balanced weights of the training split's classes, and the smoothing.
    counts = json.loads(re.search(r"INFO fold \d+: (\{.*\})", proc.stderr).group(1))["train_label_counts"]
    n = sum(counts.values())
    expected = [n / (len(counts) * c) for c in counts.values()]
    (rows,) = read_probe_losses(tmp_path / "probe").values()
    assert len(rows) == 5  # one micro-batch per step
    for row in rows:
        assert row["label_smoothing"] == 0.1
        assert row["class_weights"] == pytest.approx(expected, rel=1e-6), (row["class_weights"], counts)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["stop_reason"], metrics["steps"], metrics["best_step"]) == ("max_steps", 5, 5)
    assert validations(proc.stderr) and [s for s, _ in validations(proc.stderr)] == [5]
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [5]
    assert "5 optimizer steps" in proc.stderr
    # The lr each step was taken with: max_steps ends this run, so its progress is step / 5; warm-up
    # over the first 40 % (2 steps, reaching the peak at the 2nd), then linear decay from where each
    # step starts. Every group follows its own peak (train.head_lr=3e-3, the tiny encoders' too).
    from emotrain.train.tracking import HISTORY_FILE, read_history

    logged = {row["train/step"]: row for row in read_history(out / HISTORY_FILE) if "train/lr_head" in row}
    assert sorted(logged) == [1, 2, 3, 4, 5]
    factors = [0.5, 1.0, 1.0, 2 / 3, 1 / 3]
    assert [logged[s]["train/lr_head"] for s in range(1, 6)] == pytest.approx([3e-3 * f for f in factors])
    assert [logged[s]["train/lr_text_encoder"] for s in range(1, 6)] == pytest.approx([3e-3 * f for f in factors])
    # Once per part: not again per parameter group (weights and undecayed biases share their part's lr).
    assert {key for row in logged.values() for key in row if key.startswith("train/lr")} == {
        "train/lr_audio_encoder", "train/lr_text_encoder", "train/lr_head"}


def test_an_epoch_end_on_an_evaluation_step_is_evaluated_once(synthetic_corpus, tmp_path):
    """eval_every_steps = the epoch's step count: its end is an evaluation step. One validation there
    (a second one, of the same weights, would burn early-stopping patience: patience 1 would stop)."""
    from emotrain.config import load_config
    from emotrain.data.folds import split_from_config
    from emotrain.data.plan import StreamSettings, plan_epoch

    overrides = tiny_overrides(synthetic_corpus, tmp_path / "run", "train.max_epochs=1",
                               "train.early_stopping_patience=1", "train.checkpoint_every_steps=0")
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    settings = StreamSettings.from_config(cfg.data, cfg.train.batch_size, cfg.train.seed)
    # The recipe's epoch, whatever number of data workers it picks on this machine (they change no batch).
    accumulation = cfg.train.gradient_accumulation_steps
    (plan,) = plan_epoch(split_from_config(cfg.data, seed=cfg.train.seed), settings, 1, epoch=0,
                         accumulation=accumulation)
    steps = len(plan) // accumulation
    proc = run_probe([*overrides, f"train.eval_every_steps={steps}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [s for s, _ in validations(proc.stderr)] == [steps]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["stop_reason"], metrics["steps"], metrics["best_step"]) == ("max_epochs", steps, steps)


def test_the_rest_of_an_epoch_too_small_for_a_step_ends_the_epoch_at_the_step_it_stopped_at(synthetic_corpus,
                                                                                          tmp_path):
    """What a resume onto more ranks can leave: the epoch ends at its step (5) without a new step, that
    step is validated and saved once, its log line is not written again, and the checkpoint resumes
    the next epoch."""
    from emotrain.train.tracking import HISTORY_FILE, read_history

    out = tmp_path / "run"
    script = REPO / "tests" / "integration" / "scripts" / "short_epoch.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "fit.json"), str(REPO / "configs" / "smoke.yaml"),
         *tiny_overrides(synthetic_corpus, out, "train.max_epochs=1", "logging.log_every_steps=5",
                         "logging.report_to=[]", "train.checkpoint_every_steps=0")],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "cannot fill a step on 1 rank(s): the epoch ends here" in proc.stderr
    fitted = json.loads((tmp_path / "fit.json").read_text())
    assert fitted == {"exit_code": 0, "epoch": 1, "step": 5, "stop_reason": "max_epochs", "last_evaluation_step": 5,
                      "stream_epoch": 1}, fitted
    assert [s for s, _ in validations(proc.stderr)] == [5]
    assert not any("train/loss" in row or "train/utterances_per_second" in row
                   for row in read_history(out / HISTORY_FILE))  # step 5 was logged before the stop
    folder = out / "checkpoints" / "step-000005"  # saved on the next epoch, stream and loop alike
    assert json.loads((folder / "stream-rank0.json").read_text())["epoch"] == 1
    assert json.loads((folder / "loop_state.json").read_text())["epoch"] == 1
