"""2 CPU processes under `accelerate launch`: evaluation counts each utterance once, ranks take equal steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.toyset import write_toy_prepared

SCRIPT = Path(__file__).parent / "scripts" / "data_distributed.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_evaluate_each_utterance_once_and_take_equal_steps(tmp_path):
    # Fold 1: the test set (session 1) has 13 utterances and validation 7 (20% of 36): odd sizes,
    # so one rank gets a batch more and the other a filler that must not be scored.
    root = write_toy_prepared(tmp_path / "prepared", per_session=[13, 9, 10, 9, 8], num_shards=3)
    out = tmp_path / "out"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [
        str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), str(root), str(out),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2]

    for name, size in (("test", 13), ("validation", 7)):
        for r in results:  # every rank gathers the same complete list
            got = r[name]
            counts = Counter(got["ids"])
            assert sorted(counts) == got["expected"], name
            assert set(counts.values()) == {1}, f"{name}: duplicated {[i for i, c in counts.items() if c > 1]}"
            assert [got["expected_labels"][i] for i in got["ids"]] == got["labels"]
            assert got["batches"][0] == got["batches"][1], got["batches"]  # the same number of forwards
            # evaluate() over the same loaders: each utterance scored once, fillers ignored.
            assert got["oracle"] == {"n": size, "ua": 1.0, "n_skipped": 0}, got["oracle"]
        assert len(results[0][name]["ids"]) == size

    counts = results[0]["num_batches"]
    assert counts[0] == counts[1] and counts[0] % 2 == 0, counts  # equal steps, whole accumulations
    assert [r["yielded_batches"] for r in results] == counts
    ids = results[0]["epoch_ids"] + results[1]["epoch_ids"]
    assert sorted(ids) == results[0]["train_ids"]  # the epoch: every training utterance once
    assert len(ids) == results[0]["utterances_sum"] == sum(results[0]["step_utterances"])
    assert results[0]["step_utterances"] == results[1]["step_utterances"]  # every rank knows every step's size
