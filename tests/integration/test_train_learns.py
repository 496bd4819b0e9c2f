"""The recipe really trains: on the synthetic corpus only fusion can separate all four classes."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import run_train, tiny_overrides

pytestmark = pytest.mark.slow


def _train(corpus, out, variant):
    proc = run_train(tiny_overrides(corpus, out, f"model.variant={variant}", "model.freeze_feature_encoder=null",
                                    "train.max_epochs=15",
                                    "train.early_stopping_patience=0", "train.checkpoint_every_steps=0"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text()), proc.stdout + proc.stderr


def test_fusion_beats_both_unimodal_baselines(synthetic_corpus, tmp_path, fold1_sizes):
    results = {v: _train(synthetic_corpus, tmp_path / v, v) for v in ("fusion", "audio", "text")}
    ua = {v: m["test"]["ua"] for v, (m, _) in results.items()}
    # Chance is 0.25. Audio alone only knows arousal and text alone only valence, so each tops out
    # near 0.5; fusion can get all four classes.
    assert ua["fusion"] >= 0.70, ua
    assert ua["fusion"] >= max(ua["audio"], ua["text"]) + 0.2, ua
    assert ua["audio"] <= 0.62 and ua["text"] <= 0.62, ua

    metrics, log = results["fusion"]
    test = metrics["test"]
    n = fold1_sizes["num_test"]
    assert test["n"] == n and sum(map(sum, test["confusion"])) == n  # every test utterance once
    assert set(test["per_class_recall"]) == {"neutral", "happy", "sad", "angry"}
    assert 0 < metrics["best_step"] <= metrics["steps"]
    assert metrics["validation"]["ua"] > 0.5
    # The loss went down: the first logged window against the last.
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if " loss " in line]
    assert len(losses) >= 10 and losses[-1] < 0.6 * losses[0], losses
    # The printed table names WA and UA and every class.
    assert "WA = accuracy, UA = mean per-class recall" in log and "neutral" in log
