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
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import TINY  # noqa: E402

from runs import synthetic_prepared, train  # noqa: E402


def run(corpus: Path, out: Path, steps: int, processes: int) -> dict:
    rows = train([f"data.path={corpus}", f"output_dir={out}", f"train.max_steps={steps}", "train.max_epochs=100",
                  *TINY], processes=processes, launch="ddp")
    windows = [row for row in rows if "perf/step_seconds" in row][1:]
    return {key: statistics.mean(w[key] for w in windows)
            for key in ("train/utterances_per_second", "perf/step_seconds", "perf/data_wait_share")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--utterances-per-session", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emotrain-scaling-bench-") as tmp:
        work = Path(tmp)
        corpus = synthetic_prepared(work, args.utterances_per_session)
        results = {n: run(corpus, work / f"run{n}", args.steps, n) for n in (1, 2)}
    base = results[1]["train/utterances_per_second"]
    print("| processes | utterances/s (all ranks) | speed-up | s/step | waiting for data |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n, r in results.items():
        print(f"| {n} | {r['train/utterances_per_second']:.1f} | {r['train/utterances_per_second'] / base:.2f}x | "
              f"{r['perf/step_seconds']:.3f} | {r['perf/data_wait_share']:.0%} |")


if __name__ == "__main__":
    main()
