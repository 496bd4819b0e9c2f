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


@pytest.fixture(scope="session")
def synthetic_corpus(tmp_path_factory) -> Path:
    """`emotrain synth` + `emotrain prepare`: 48 4-class utterances per session, short durations."""
    from emotrain.data.prepare import prepare
    from emotrain.data.synth import synthesize_release

    root = tmp_path_factory.mktemp("synthetic")
    synthesize_release(root / "release", seed=1, utterances_per_session=48, duration_scale=0.3)
    prepare(root / "release", root / "prepared", workers=1)
    return root / "prepared"


def tiny_overrides(corpus: Path, output_dir: Path, *extra: str) -> list[str]:
    """configs/smoke.yaml shrunk to tiny random encoders (both sides) that train in seconds."""
    return [
        f"data.path={corpus}",
        f"output_dir={output_dir}",
        "model.text_encoder=tiny",
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
