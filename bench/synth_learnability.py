"""What the synthetic corpus lets the recipe learn: audio-only (random conv encoder trained or frozen),
text-only and fusion, with the tiny encoders of the learning test.

    python bench/synth_learnability.py --seeds 1 2 --train-seeds 42
    python bench/synth_learnability.py --module /tmp/old_synth.py   # another synth.py, e.g. from git

For every corpus seed: `synthesize_release` (48 4-class utterances per session, duration_scale 0.3,
as tests/integration/conftest.py), `prepare`, then `emotrain train configs/smoke.yaml` with the
learning test's overrides (tiny random encoders, lr 2e-3, 15 epochs, fold 1) per variant and training
seed. Prints one row per run: test UA and, from the confusion matrix, the share of test utterances
whose predicted class has the right arousal and the right valence. Audio alone can only know arousal
and text alone only valence, so each tops out near UA 0.5; `audio, frozen conv` keeps the random
convolutional feature encoder frozen (what a corpus must not reward). About 2.5 minutes per corpus
seed and training seed on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "audio": ["model.variant=audio", "model.freeze_feature_encoder=false"],
    "audio, frozen conv": ["model.variant=audio", "model.freeze_feature_encoder=true"],
    "text": ["model.variant=text", "model.freeze_feature_encoder=false"],
    "fusion": ["model.variant=fusion", "model.freeze_feature_encoder=false"],
}
AROUSAL = {"neutral": 0, "sad": 0, "happy": 1, "angry": 1}
VALENCE = {"neutral": 1, "happy": 1, "sad": 0, "angry": 0}


def load_synthesize(module: str | None):
    if module is None:
        from emotrain.data.synth import synthesize_release

        return synthesize_release
    spec = importlib.util.spec_from_file_location("synth_under_test", module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.synthesize_release


def dimension_accuracy(test: dict, dimension: dict[str, int]) -> float:
    """Share of utterances whose predicted class agrees with the true one on one dimension."""
    names = list(test["per_class_recall"])  # the label order of the confusion matrix
    confusion = test["confusion"]
    hits = sum(confusion[i][j] for i in range(len(names)) for j in range(len(names))
               if dimension[names[i]] == dimension[names[j]])
    return hits / sum(map(sum, confusion))


def train(corpus: Path, out: Path, variant: str, seed: int, epochs: int) -> tuple[dict, float]:
    overrides = [
        f"data.path={corpus}", f"output_dir={out}", "model.text_encoder=tiny", "model.hidden_size=32",
        "model.classifier_hidden_size=32", "train.lr=2e-3", "train.head_lr=3e-3", "train.batch_size=8",
        "data.max_batch_audio_seconds=16", "logging.progress_bar=false", f"train.max_epochs={epochs}",
        "train.early_stopping_patience=0", "train.checkpoint_every_steps=0", f"train.seed={seed}",
        *VARIANTS[variant],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "emotrain.cli", "train", str(REPO / "configs/smoke.yaml"), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads((out / "metrics.json").read_text())["test"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="corpus seeds (the test uses 1)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[42], help="train.seed values")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--module", help="a synth.py to load instead of emotrain.data.synth")
    parser.add_argument("--utterances-per-session", type=int, default=48)
    parser.add_argument("--duration-scale", type=float, default=0.3)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()

    from emotrain.data.prepare import prepare

    synthesize_release = load_synthesize(args.module)
    print("| corpus seed | train seed | variant | test UA | arousal right | valence right | seconds |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="emotrain-synth-bench-") as tmp:
        for seed in args.seeds:
            work = Path(tmp) / f"seed{seed}"
            synthesize_release(work / "release", seed=seed, utterances_per_session=args.utterances_per_session,
                               duration_scale=args.duration_scale)
            prepare(work / "release", work / "prepared", workers=1)
            for train_seed in args.train_seeds:
                for variant in args.variants:
                    out = work / "runs" / f"{train_seed}-{variant.replace(', ', '-').replace(' ', '-')}"
                    test, seconds = train(work / "prepared", out, variant, train_seed, args.epochs)
                    print(f"| {seed} | {train_seed} | {variant} | {test['ua']:.3f} | "
                          f"{dimension_accuracy(test, AROUSAL):.2f} | {dimension_accuracy(test, VALENCE):.2f} | "
                          f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
