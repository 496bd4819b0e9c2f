"""What the synthetic corpora let the recipe learn: fusion, audio-only and text-only on the hand-made
signal and on the speaking corpus (espeak-ng), per corpus seed and training seed.

    python bench/synth_learnability.py                               # smoke settings, both corpora
    python bench/synth_learnability.py --settings test --seeds 1 2   # the learning test's settings
    python bench/synth_learnability.py --speech espeak --cues pitch --variants audio   # one cue alone
    python bench/synth_learnability.py --module /tmp/old_synth.py   # another synth.py, e.g. from git

For every corpus (`--speech`) and corpus seed: `synthesize_release`, `prepare`, then `emotrain train
configs/smoke.yaml` per variant and training seed, fold 1 (test on session 1). `--settings smoke`:
the configuration as shipped (tiny random Wav2Vec2, the pretrained MiniLM, its learning rates and
epochs) on the corpus `emotrain synth` writes by default (120 4-class utterances per session,
durations x0.5). `--settings test`: the learning test's (tests/integration: tiny random encoders on
both sides, 15 epochs) on its corpus (48 per session, x0.3). Prints one row per run: test UA and,
from the confusion matrix, the share of test utterances whose predicted class has the right arousal
and the right valence. Audio alone can only know arousal and text alone only valence, so each tops
out near UA 0.5. `audio, frozen conv` keeps the random convolutional feature encoder frozen.
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
    "fusion": ["model.variant=fusion"],
    "audio": ["model.variant=audio"],
    "audio, frozen conv": ["model.variant=audio", "model.freeze_feature_encoder=true"],
    "text": ["model.variant=text"],
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


SETTINGS = {
    # configs/smoke.yaml as shipped, on `emotrain synth`'s default corpus
    "smoke": {"overrides": [], "utterances_per_session": 120, "duration_scale": 0.5},
    # the learning test's (tests/integration/conftest.py: tiny_overrides, test_train_learns.py)
    "test": {"overrides": ["model.text_encoder=tiny", "model.hidden_size=32", "model.classifier_hidden_size=32",
                           "train.lr=2e-3", "train.head_lr=3e-3", "train.batch_size=8",
                           "data.max_batch_audio_seconds=16", "train.max_epochs=15",
                           "train.early_stopping_patience=0"],
             "utterances_per_session": 48, "duration_scale": 0.3},
}


def train(corpus: Path, out: Path, variant: str, seed: int, settings: list[str], extra: list[str]) -> tuple[dict, float]:
    overrides = [f"data.path={corpus}", f"output_dir={out}", "logging.progress_bar=false",
                 "train.checkpoint_every_steps=0", f"train.seed={seed}", *settings, *VARIANTS[variant], *extra]
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
    parser.add_argument("--settings", choices=list(SETTINGS), default="smoke")
    parser.add_argument("--speech", nargs="+", default=["signal", "espeak"], choices=["signal", "espeak"],
                        help="the corpora: the hand-made signal, espeak-ng speech")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="corpus seeds (the test uses 1)")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[42], help="train.seed values")
    parser.add_argument("--variants", nargs="+", default=["fusion", "audio", "text"], choices=list(VARIANTS))
    parser.add_argument("--cues", nargs="+", help="espeak corpus: the arousal cues (default: all)")
    parser.add_argument("--module", help="a synth.py to load instead of emotrain.data.synth (signal only)")
    parser.add_argument("--utterances-per-session", type=int, help="default: the settings' corpus")
    parser.add_argument("--duration-scale", type=float, help="default: the settings' corpus")
    parser.add_argument("overrides", nargs="*", help="more dotted overrides for every run")
    args = parser.parse_args()

    from emotrain.data.prepare import prepare

    if args.module and args.speech != ["signal"]:
        parser.error("--module loads an older synth.py: use it with --speech signal")
    settings = SETTINGS[args.settings]
    per_session = args.utterances_per_session or settings["utterances_per_session"]
    scale = args.duration_scale or settings["duration_scale"]
    synthesize_release = load_synthesize(args.module)
    print(f"settings {args.settings}: configs/smoke.yaml {' '.join(settings['overrides'] + args.overrides)}; "
          f"corpus {per_session} 4-class utterances per session, durations x{scale}; fold 1")
    print("| corpus | corpus seed | train seed | variant | test UA | arousal right | valence right | seconds |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory(prefix="emotrain-synth-bench-") as tmp:
        for speech in args.speech:
            cues = {"arousal_cues": tuple(args.cues)} if speech == "espeak" and args.cues else {}
            corpus_name = speech + (f" ({', '.join(args.cues)})" if cues else "")
            for seed in args.seeds:
                work = Path(tmp) / f"{speech}-seed{seed}"
                engine = {} if args.module else {"speech": speech, **cues}  # an older synth.py: signal only
                synthesize_release(work / "release", seed=seed, utterances_per_session=per_session,
                                   duration_scale=scale, **engine)
                prepare(work / "release", work / "prepared", workers=1)
                for train_seed in args.train_seeds:
                    for variant in args.variants:
                        out = work / "runs" / f"{train_seed}-{variant.replace(', ', '-').replace(' ', '-')}"
                        test, seconds = train(work / "prepared", out, variant, train_seed, settings["overrides"],
                                              args.overrides)
                        print(f"| {corpus_name} | {seed} | {train_seed} | {variant} | {test['ua']:.3f} | "
                              f"{dimension_accuracy(test, AROUSAL):.2f} | {dimension_accuracy(test, VALENCE):.2f} | "
                              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
