"""A compiled model (torch.compile through Accelerate's dynamo config) trains what the plain one trains.

The dynamo backend here is `eager` (graphs captured by dynamo, run by eager PyTorch): the same
arithmetic as the plain model, so the two runs must agree exactly, and it compiles in seconds on a
CPU (inductor takes minutes per graph here: bench/RESULTS.md). What is tested is emotrain's side:
the recipe, its checkpoints and the saved best model with a compiled (wrapped) model.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from emotrain.model import EmotionModel
from tests.integration.conftest import EMOTRAIN, REPO, run_train, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

COMMON = ("train.max_steps=8", "train.checkpoint_every_steps=4", "train.eval_every_steps=4", "data.length_ladder=4")


def test_a_compiled_model_trains_saves_and_loads_like_the_plain_one(synthetic_corpus, tmp_path):
    runs = {}
    for name, extra_env in {"plain": {}, "compiled": {"ACCELERATE_DYNAMO_BACKEND": "EAGER",
                                                      "ACCELERATE_DYNAMO_USE_DYNAMIC": "true"}}.items():
        out = tmp_path / name
        proc = run_train(tiny_overrides(synthetic_corpus, out, *COMMON), env=subprocess_env(**extra_env))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        runs[name] = (out, proc.stdout + proc.stderr)
    (plain, _), (compiled, log) = runs["plain"], runs["compiled"]
    assert "torch.compile" in log and "backend eager" in log, log[-3000:]  # it really was compiled
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (plain, compiled))
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
    # The best model is saved under the model's own names (not torch.compile's `_orig_mod.` ones) and loads.
    weights = {run: load_file(run / "best" / "model.safetensors") for run in (plain, compiled)}
    assert weights[plain].keys() == weights[compiled].keys()
    for key, value in weights[plain].items():
        assert torch.equal(value, weights[compiled][key]), key
    EmotionModel.from_pretrained(compiled / "best")
    evaluated = subprocess.run([*EMOTRAIN, "evaluate", str(compiled / "best"), str(synthetic_corpus), "--session", "1"],
                               cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
