"""Training throughput of the recipe on this machine: fixed-size vs duration-bucketed batches.

    python bench/train_throughput.py --steps 60

Synthesises a small corpus with IEMOCAP's duration shape (full-length utterances), prepares it,
and runs `emotrain train` (configs/smoke.yaml, tiny random encoders on both sides) for a fixed
number of optimizer steps with each batching mode. Prints one row per mode from the recipe's own
log windows (the first window, which pays for start-up, is left out): utterances/s, audio
seconds/s and padding efficiency.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, synthetic_prepared  # noqa: E402

LINE = re.compile(r"step (\d+) epoch \d+ loss [\d.]+ \| ([\d.]+) utt/s, ([\d.]+) audio s/s, padding efficiency ([\d.]+)")


def run(corpus: Path, out: Path, steps: int, extra: list[str]) -> list[tuple[float, float, float]]:
    overrides = [
        f"data.path={corpus}", f"output_dir={out}", f"train.max_steps={steps}", "train.max_epochs=100",
        "model.text_encoder=tiny", "model.hidden_size=32", "model.classifier_hidden_size=32",
        "train.checkpoint_every_steps=0", "train.early_stopping_patience=0", "logging.progress_bar=false",
        "logging.log_every_steps=10", "data.max_audio_seconds=15", *extra,
    ]
    proc = subprocess.run([sys.executable, "-m", "emotrain.cli", "train", str(REPO / "configs/smoke.yaml"), *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    windows = [tuple(map(float, m.groups()[1:])) for m in LINE.finditer(proc.stderr)]
    return windows[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--utterances-per-session", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emotrain-train-bench-") as tmp:
        work = Path(tmp)
        corpus = synthetic_prepared(work, args.utterances_per_session)
        modes = {
            "fixed, 8 per batch": ["data.batching=fixed", "train.batch_size=8"],
            # The same worst-case padded audio per batch as fixed-8 with 15 s crops (8 x 15 s).
            "bucketed, <= 120 s padded, <= 32": ["data.batching=bucket", "data.max_batch_audio_seconds=120",
                                                 "train.batch_size=32"],
        }
        print("| batching | utterances/s | audio s/s | padding efficiency | windows |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, extra in modes.items():
            windows = run(corpus, work / name.split(",")[0], args.steps, extra)
            utt, audio, eff = (statistics.mean(w[i] for w in windows) for i in range(3))
            print(f"| {name} | {utt:.1f} | {audio:.1f} | {eff:.2f} | {len(windows)} |")


if __name__ == "__main__":
    main()
