"""Runs that go wrong stop clearly; secrets never reach what a run writes; TensorBoard works too."""

from __future__ import annotations

import pytest

from tests.integration.conftest import REPO, read_probe, run_probe, run_train, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow


def test_diverging_run_stops_with_a_clear_message_and_never_applies_a_bad_step(synthetic_corpus, tmp_path):
    # An absurd learning rate: after the first update every loss is NaN; each such step is skipped
    # and counted, and the run stops after 3 in a row instead of training on NaN.
    proc = run_probe(tiny_overrides(synthetic_corpus, tmp_path / "run", "train.lr=1e30", "train.head_lr=1e30",
                                    "train.warmup_ratio=0", "train.max_consecutive_nonfinite=3",
                                    "train.max_epochs=1"), EMOTRAIN_PROBE_DIR=str(tmp_path / "probe"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 steps in a row with non-finite gradients at step 4" in proc.stderr
    assert proc.stderr.count("step skipped") == 3
    assert "Traceback" not in proc.stderr
    # Never applied: the weights at the start of steps 2, 3 and 4 (and after them) are the ones step 1 left.
    (records,) = read_probe(tmp_path / "probe").values()
    sums = [r["param_sum"] for r in records]
    assert len(sums) == 4 and sums[0] != sums[1], sums
    assert sums[1] == sums[2] == sums[3], sums


def test_a_run_folder_with_another_config_is_refused(synthetic_corpus, tmp_path):
    from emotrain.config import load_config, save_config

    out = tmp_path / "run"
    overrides = tiny_overrides(synthetic_corpus, out)
    save_config(load_config(REPO / "configs" / "smoke.yaml", overrides), out / "config.yaml")  # an earlier run,
    (out / "metrics.json").write_text("{}")  # ... which got as far as results
    proc = run_train([*overrides, "train.lr=1e-4", "logging.log_every_steps=3"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "output_dir: " in proc.stderr and "train.lr: 0.002 there, 0.0001 now" in proc.stderr
    assert "logging.log_every_steps" not in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.json"]  # nothing written


def test_secrets_stay_out_of_outputs_and_tensorboard_logs(synthetic_corpus, tmp_path):
    secret_key, secret_token = "wandbkey-0123456789abcdef0123456789", "hf_SECRETtoken0123456789"
    out = tmp_path / "run"
    proc = run_train(
        tiny_overrides(synthetic_corpus, out, "train.max_epochs=1", "logging.report_to=[wandb,tensorboard]"),
        env=subprocess_env(WANDB_API_KEY=secret_key, HF_TOKEN=secret_token),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "TensorBoard wrote no event file"
    _assert_tensorboard_has_the_steps_of_the_history(events[0].parent, out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 20
    for path in files:
        data = path.read_bytes()
        assert secret_key.encode() not in data and secret_token.encode() not in data, path
    assert secret_key not in proc.stdout + proc.stderr and secret_token not in proc.stdout + proc.stderr


def _assert_tensorboard_has_the_steps_of_the_history(event_dir, out) -> None:
    """TensorBoard's own reader finds every scalar at the optimizer step it was logged at (not all at 0)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from emotrain.train.tracking import STEP_METRIC, read_history

    scalars = EventAccumulator(str(event_dir), size_guidance={"scalars": 0}).Reload()
    history = read_history(out / "history.jsonl")
    for key in ("train/loss", "train/lr_head", "eval/loss", "eval/ua", "test/ua", "test/recall_neutral"):
        logged = [(row[STEP_METRIC], row[key]) for row in history if key in row]
        read = [(event.step, event.value) for event in scalars.Scalars(key)]
        assert [step for step, _ in read] == [step for step, _ in logged] and logged[-1][0] > 0, (key, read, logged)
        assert [value for _, value in read] == pytest.approx([value for _, value in logged], rel=1e-6), key


def test_wandb_disabled_mode_trains_and_writes_no_run(synthetic_corpus, tmp_path):
    out = tmp_path / "run"
    proc = run_train(tiny_overrides(synthetic_corpus, out, "train.max_epochs=1", "logging.report_to=[wandb]",
                                    "logging.wandb_mode=disabled"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "metrics.json").is_file()
    assert not (out / "wandb").exists()


@pytest.mark.parametrize("override, message", [
    ("data.sampling_rate=8000", "data.sampling_rate: is 8000 Hz but the audio encoder 'tiny' takes 16000 Hz audio"),
    ("data.max_text_tokens=600", "data.max_text_tokens: is 600 but the text encoder 'tiny' takes at most 512 tokens"),
])
def test_data_the_encoders_cannot_take_is_refused_before_any_step(synthetic_corpus, tmp_path, override, message):
    """Checked at model build inside the recipe (the config alone cannot know the encoders' limits),
    typed as a new user would (`mixed_precision=no`, `report_to=none` on the command line)."""
    out = tmp_path / "run"
    proc = run_train(tiny_overrides(synthetic_corpus, out, override, "train.mixed_precision=no", "logging.report_to=none"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"emotrain: config error: {message}: set {override.split('=')[0]}"), lines[-1]
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()  # no step was taken
