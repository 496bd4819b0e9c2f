"""The recipe's loop overhead: `emotrain train`'s step against a bare PyTorch loop on the same batches.

    python bench/loop_overhead.py --steps 60

Both train the same model (configs/smoke.yaml with tiny random encoders on both sides, same seed,
same AdamW parameter groups and schedule) on the same batches (the training stream's own, in the
same order). `emotrain train` runs as users run it; its step time comes from its own telemetry
(`perf/step_seconds` in history.jsonl, evaluation and saving left out) and is shown with and
without the time it waited for data (`perf/data_wait_share`: with `data.num_workers=0` the batches
are decoded in the training process). The bare loop gets the batches decoded before the clock
starts and does only forward, loss, backward, clipping and the optimizer step. The first window
(start-up) is left out of both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, synthetic_prepared, train  # noqa: E402

TINY = ["model.text_encoder=tiny", "model.hidden_size=32", "model.classifier_hidden_size=32",
        "model.freeze_feature_encoder=true", "train.checkpoint_every_steps=0", "train.early_stopping_patience=0",
        "logging.progress_bar=false", "logging.log_every_steps=10", "data.max_audio_seconds=15", "data.num_workers=0"]


def emotrain_step_seconds(corpus: Path, out: Path, steps: int) -> tuple[float, float]:
    """(seconds per step, share of it waiting for data), from the recipe's log windows after the first."""
    rows = train([f"data.path={corpus}", f"output_dir={out}", f"train.max_steps={steps}", "train.max_epochs=100",
                  *TINY])
    windows = [row for row in rows if "perf/step_seconds" in row][1:]
    return (statistics.mean(w["perf/step_seconds"] for w in windows),
            statistics.mean(w["perf/data_wait_share"] for w in windows))


def bare_step_seconds(corpus: Path, steps: int) -> float:
    """Seconds per step of a plain loop over the stream's batches, decoded before the clock."""
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed

    from emotrain.config import load_config
    from emotrain.data.folds import split_from_config
    from emotrain.data.stream import build_train_stream
    from emotrain.model import build_model, build_processors
    from emotrain.train.evaluation import model_inputs
    from emotrain.train.optim import build_optimizer

    cfg = load_config(REPO / "configs/smoke.yaml", [f"data.path={corpus}", "output_dir=/tmp/unused",
                                                    f"train.max_steps={steps}", *TINY])
    set_seed(cfg.train.seed)
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    feature_extractor, tokenizer = build_processors(cfg.model)
    stream = build_train_stream(cfg, split, feature_extractor=feature_extractor, tokenizer=tokenizer, rank=0, world_size=1)
    batches = []
    epoch = 0
    while len(batches) < steps:
        stream.set_epoch(epoch)
        batches.extend(stream)
        epoch += 1
    batches = batches[:steps]
    model = build_model(cfg.model)
    model.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    model.train()
    times = []
    for batch in batches:
        started = time.perf_counter()
        logits = model(**model_inputs(batch)).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.mean(times[10:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--utterances-per-session", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emotrain-loop-bench-") as tmp:
        work = Path(tmp)
        corpus = synthetic_prepared(work, args.utterances_per_session)
        step, waiting = emotrain_step_seconds(corpus, work / "run", args.steps)
        bare = bare_step_seconds(corpus, args.steps)
    print("| loop | s/step | vs bare loop |")
    print("| --- | ---: | ---: |")
    print(f"| bare PyTorch loop, batches decoded before the clock | {bare:.4f} | 1.00x |")
    print(f"| emotrain train, without its data wait ({waiting:.0%} of its step) | {step * (1 - waiting):.4f} | "
          f"{step * (1 - waiting) / bare:.2f}x |")
    print(f"| emotrain train, as run (decoding in the training process) | {step:.4f} | {step / bare:.2f}x |")


if __name__ == "__main__":
    main()
