"""Scaling over processes: the same training on 1 and on 2 processes (DDP; gloo on a CPU machine).

    python bench/scaling.py --steps 40

`emotrain train` (configs/smoke.yaml, tiny random encoders) on 1 process (all cores) and on 2
processes (one core each: OMP_NUM_THREADS=1) over the same data and per-rank batch budget, so two
processes take twice the utterances per step. Figures from the recipe's telemetry (history.jsonl),
the first window left out: utterances/s over all ranks, seconds per step, the share of a step spent
waiting for data.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from loop_overhead import TINY  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(corpus: Path, out: Path, steps: int, processes: int) -> dict:
    overrides = [f"data.path={corpus}", f"output_dir={out}", f"train.max_steps={steps}", "train.max_epochs=100", *TINY]
    script = [str(REPO / "configs/smoke.yaml"), *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if processes == 1:
        command = [sys.executable, "-m", "emotrain.cli", "train", *script]
    else:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_port()), "-m", "emotrain.cli", "train", *script]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    windows = [row for row in rows if "perf/step_seconds" in row][1:]
    return {key: statistics.mean(w[key] for w in windows)
            for key in ("train/utterances_per_second", "perf/step_seconds", "perf/data_wait_share")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--utterances-per-session", type=int, default=60)
    args = parser.parse_args()

    from emotrain.data.prepare import prepare
    from emotrain.data.synth import synthesize_release

    with tempfile.TemporaryDirectory(prefix="emotrain-scaling-bench-") as tmp:
        work = Path(tmp)
        synthesize_release(work / "release", seed=0, utterances_per_session=args.utterances_per_session)
        prepare(work / "release", work / "prepared", workers=1)
        results = {n: run(work / "prepared", work / f"run{n}", args.steps, n) for n in (1, 2)}
    base = results[1]["train/utterances_per_second"]
    print("| processes | utterances/s (all ranks) | speed-up | s/step | waiting for data |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, r in results.items():
        print(f"| {n} | {r['train/utterances_per_second']:.1f} | {r['train/utterances_per_second'] / base:.2f}x | "
              f"{r['perf/step_seconds']:.3f} | {r['perf/data_wait_share']:.0%} |")


if __name__ == "__main__":
    main()
