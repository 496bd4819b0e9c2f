"""What the benchmarks that run `emotrain train` share: a synthetic prepared corpus, the command
(one process, or `accelerate launch` with DDP or DeepSpeed on this machine), and the recipe's telemetry
read back from the run's history.jsonl."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = {"ddp": "cpu_ddp.yaml", "zero2": "cpu_zero2.yaml", "zero3": "cpu_zero3.yaml"}
"""`accelerate launch` configs for a CPU machine (launch/); on GPUs pass `launch/ddp.yaml` and the like."""


def synthetic_prepared(work: Path, utterances_per_session: int, seed: int = 0) -> Path:
    """`emotrain synth` + `emotrain prepare` into `work`; returns the prepared folder."""
    from emotrain.data.prepare import prepare
    from emotrain.data.synth import synthesize_release

    synthesize_release(work / "release", seed=seed, utterances_per_session=utterances_per_session)
    prepare(work / "release", work / "prepared", workers=1)
    return work / "prepared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(overrides: list[str], *, processes: int = 1, launch: str = "ddp", config: str = "configs/smoke.yaml",
          env: dict | None = None) -> list[dict]:
    """Runs `emotrain train CONFIG overrides...` to the end; returns its history.jsonl rows
    (`output_dir=` must be among the overrides)."""
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    script = ["-m", "emotrain.cli", "train", str(REPO / config), *overrides]
    if processes == 1:
        command = [sys.executable, *script]
    else:
        env["OMP_NUM_THREADS"] = "1"
        # Not needed for DDP without a GPU (the recipe runs a GPU config on the CPU), and it would
        # silently turn DeepSpeed into plain MULTI_CPU.
        env.pop("ACCELERATE_USE_CPU", None)
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                   str(REPO / "launch" / LAUNCH_CONFIGS.get(launch, launch)), "--num_processes", str(processes),
                   "--main_process_port", str(free_port()), *script]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed:\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
