"""Shared fixtures for tests that really train: a small learnable corpus and tiny-encoder overrides."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EMOTRAIN = [sys.executable, "-m", "emotrain.cli"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def prepared_synthetic_corpus(root: Path, utterances_per_session: int) -> Path:
    """`emotrain synth` + `emotrain prepare` into `root`: `utterances_per_session` 4-class utterances
    per session, short durations (seed 1). Returns the prepared folder."""
    from emotrain.data.prepare import prepare
    from emotrain.data.synth import synthesize_release

    synthesize_release(root / "release", seed=1, utterances_per_session=utterances_per_session, duration_scale=0.3)
    prepare(root / "release", root / "prepared", workers=1)
    return root / "prepared"


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """48 4-class utterances per session, short durations (`prepared_synthetic_corpus`)."""
    return prepared_synthetic_corpus(tmp_path_factory.mktemp("synthetic"), 48)


@pytest.fixture(scope="session")
def fold1_sizes(synthetic_corpus) -> dict:
    """{"num_train", "num_validation", "num_test"} of fold 1 of the fixture corpus, as the runs of
    `tiny_overrides` split it (what every run must train on once per epoch and evaluate once)."""
    from emotrain.config import load_config
    from emotrain.data.folds import split_from_config

    cfg = load_config(REPO / "configs" / "smoke.yaml", tiny_overrides(synthetic_corpus, Path("unused")))
    summary = split_from_config(cfg.data, seed=cfg.train.seed).summary()
    return {key: summary[key] for key in ("num_train", "num_validation", "num_test")}


def tiny_overrides(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    """configs/smoke.yaml shrunk to tiny random encoders (both sides) that train in seconds.

    The random conv feature encoder is frozen here, unlike the default for a `tiny` encoder (trained
    whole): its backward over raw audio makes a CPU step ~2.5x slower, and what these runs test (the
    loop's mechanics) does not depend on it. The learning test passes `model.freeze_feature_encoder=null`
    (the default) to train it whole, as the smoke configuration does.
    """
    return [
        f"data.path={corpus}",
        f"output_dir={output_dir}",
        "model.text_encoder=tiny",
        "model.freeze_feature_encoder=true",
        "model.hidden_size=32",
        "model.classifier_hidden_size=32",
        "train.lr=2e-3",  # the encoders are random: they learn at the head's pace
        "train.head_lr=3e-3",
        "train.batch_size=8",
        "data.max_batch_audio_seconds=16",
        "logging.progress_bar=false",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: offline, quiet, one thread per process."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def run_train(overrides: list[str], *, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`emotrain train configs/smoke.yaml ...` as a subprocess (its own process, signals and all)."""
    return subprocess.run(
        [*EMOTRAIN, "train", str(REPO / "configs" / "smoke.yaml"), *overrides],
        cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


PROBE = REPO / "tests" / "integration" / "scripts" / "train_probe.py"
"""`emotrain` with test probes (see its docstring): record batches, inject faults, stop at a step."""


def run_probe(overrides: list[str], *, timeout: int = 600, **probe_env: str) -> subprocess.CompletedProcess:
    """`train_probe.py train configs/smoke.yaml ...` in one process; `probe_env` sets EMOTRAIN_PROBE_*."""
    return subprocess.run(
        [sys.executable, str(PROBE), "train", str(REPO / "configs" / "smoke.yaml"), *overrides],
        cwd=REPO, env=subprocess_env(**probe_env), capture_output=True, text=True, timeout=timeout,
    )


def read_probe(folder: Path) -> dict[int, list[dict]]:
    """{rank: [batch records in the order trained]} from a probe folder (several runs append)."""
    import json

    return {
        int(path.stem[len("rank"):]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("rank*.jsonl")) if not path.name.endswith(".loss.jsonl")
    }


def read_probe_losses(folder: Path) -> dict[int, list[dict]]:
    """{rank: [what the recipe passed to its loss, per micro-batch]} from a probe folder."""
    import json

    return {
        int(path.name.split(".")[0][len("rank"):]): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.glob("rank*.loss.jsonl"))
    }


def validations(log_text: str) -> list[tuple[int, float]]:
    """(step, UA) of every validation the log reports, in order."""
    import re

    return [(int(s), float(ua)) for s, ua in re.findall(r"INFO step (\d+) validation: WA [\d.]+ UA ([\d.]+)", log_text)]


def assert_loss_denominators(probe: Path, accumulation: int) -> None:
    """Every micro-batch's loss was divided by its step's utterances over every rank and every
    micro-batch of the step, which each rank knew from the plan without asking the others."""
    records, losses = read_probe(probe), read_probe_losses(probe)
    batch_size = {(rank, r["epoch"], r["position"]): len(r["ids"]) for rank, rows in records.items() for r in rows}
    assert sorted(losses) == sorted(records) and all(len(losses[r]) == len(records[r]) for r in records)
    for rank, rows in losses.items():
        for row in rows:
            first = row["position"] - row["position"] % accumulation
            expected = sum(batch_size[(other, row["epoch"], p)] for other in records
                           for p in range(first, first + accumulation))
            assert row["step_utterances"] == expected, (rank, row, expected)
