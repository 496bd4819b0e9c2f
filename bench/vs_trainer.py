"""emotrain against the Hugging Face Trainer: same model, data, optimizer, precision and epochs.

    python bench/vs_trainer.py --epochs 3

A synthetic corpus with IEMOCAP's duration shape (full-length utterances, cropped at 15 s from the
start for both: `data.random_crop=false`), fold 1, the smoke model with tiny random encoders on both
sides, emotrain's AdamW parameter groups and schedule handed to the Trainer (`optimizers=`), the same
seed. Four runs:

- `emotrain train`, duration-bucketed batches (the default: <= 80 s padded audio, <= 8 utterances)
- `emotrain train`, fixed batches of 8
- Trainer, `group_by_length` with the lengths precomputed (no pass over the data to measure them)
- Trainer, random batches of 8

Throughput is measured after the first 10 optimizer steps (start-up left out) over training only:
utterances/s and audio seconds/s (cropped audio), padding efficiency (useful / padded samples), peak
accelerator memory (GPU only), and the validation UA after the last epoch, scored by the same code
for all four (`emotrain.train.evaluation.evaluate` on fold 1's validation speakers).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loop_overhead import TINY  # noqa: E402

from runs import REPO, synthetic_prepared, train  # noqa: E402

WARMUP_STEPS = 10


def overrides(corpus: Path, out: Path, epochs: int, extra: list[str]) -> list[str]:
    return [f"data.path={corpus}", f"output_dir={out}", f"train.max_epochs={epochs}", "data.random_crop=false",
            "train.seed=7", *TINY, *extra]


def emotrain_run(corpus: Path, out: Path, epochs: int, extra: list[str]) -> dict:
    rows = train(overrides(corpus, out, epochs, [*extra, "logging.log_every_steps=5"]))
    windows = [r for r in rows if "perf/step_seconds" in r and r["train/step"] > WARMUP_STEPS]
    validation = [r for r in rows if "eval/ua" in r]
    return {
        "utterances/s": statistics.mean(w["train/utterances_per_second"] for w in windows),
        "audio s/s": statistics.mean(w["train/audio_seconds_per_second"] for w in windows),
        "padding efficiency": statistics.mean(w["train/padding_efficiency"] for w in windows),
        "peak memory GiB": max((w.get("perf/peak_memory_gib") or 0 for w in windows), default=0) or None,
        "validation UA": validation[-1]["eval/ua"],
        "steps": rows[-1]["train/step"],
        "data wait": statistics.mean(w["perf/data_wait_share"] for w in windows),
    }


def trainer_run(corpus: Path, out: Path, epochs: int, group_by_length: bool) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from emotrain.config import load_config
    from emotrain.data.batching import Collator
    from emotrain.data.evaluation import EvalDataset, build_eval_dataloader
    from emotrain.data.folds import split_from_config
    from emotrain.model import build_model, build_processors
    from emotrain.train.evaluation import evaluate
    from emotrain.train.optim import build_optimizer, lr_factor

    cfg = load_config(REPO / "configs/smoke.yaml", overrides(corpus, out, epochs, ["train.batch_size=8"]))
    torch.manual_seed(cfg.train.seed)
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    feature_extractor, tokenizer = build_processors(cfg.model)
    max_samples = int(cfg.data.max_audio_seconds * cfg.data.sampling_rate)

    class Cropped(Dataset):  # map-style: decoded in __getitem__, cropped from the start like emotrain's run
        def __init__(self):
            self.rows = EvalDataset(split.meta, split.train_ids(), cfg.data.sampling_rate, name="train")
            self.lengths = [int(min(d, cfg.data.max_audio_seconds) * cfg.data.sampling_rate)
                            for d in self.rows.durations]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            item = self.rows[i]
            return {**item, "array": item["array"][:max_samples]}

    train_set = Cropped()
    collate = Collator(feature_extractor, tokenizer, cfg.data.max_text_tokens, cfg.data.sampling_rate)
    counted = {"useful": 0, "padded": 0, "utterances": 0, "audio": 0.0, "on": False}

    def data_collator(examples):
        batch = collate(examples)
        if counted["on"]:
            counted["useful"] += int(batch["audio_lengths"].sum())
            counted["padded"] += batch["input_values"].numel()
            counted["utterances"] += len(examples)
            counted["audio"] += batch["audio_seconds"]
        return {k: batch[k] for k in ("input_values", "audio_lengths", "input_ids", "attention_mask", "labels")}

    class LengthsGiven(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if group_by_length:  # the lengths come from the metadata: no pass over the audio
                return LengthGroupedSampler(self.args.train_batch_size, lengths=train_set.lengths)
            return super()._get_train_sampler(train_dataset)

    clock = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == WARMUP_STEPS:
                counted["on"], clock["start"] = True, time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            clock["end"] = time.perf_counter()

    model = build_model(cfg.model)
    steps = math.ceil(len(train_set) / 8) * epochs
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    # The Trainer steps a scheduler: emotrain's curve over equal steps (what the recipe's is, per step).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step / steps, (step + 1) / steps, warmup=cfg.train.warmup_ratio, schedule=cfg.train.lr_schedule))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=epochs, seed=cfg.train.seed,
        max_grad_norm=cfg.train.max_grad_norm, report_to=[], save_strategy="no", eval_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), bf16=cfg.train.mixed_precision == "bf16",
    )
    trainer = LengthsGiven(model=model, args=args, train_dataset=train_set, data_collator=data_collator,
                           optimizers=(optimizer, scheduler), callbacks=[Clock()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    counted["on"] = False
    seconds = clock["end"] - clock["start"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None

    accelerator = Accelerator()
    validation_set = EvalDataset(split.meta, split.validation_ids, cfg.data.sampling_rate, name="validation")
    loader = build_eval_dataloader(validation_set, cfg.data, feature_extractor=feature_extractor, tokenizer=tokenizer,
                                   num_workers=0)
    metrics = evaluate(accelerator, trainer.model, loader)
    return {"utterances/s": counted["utterances"] / seconds, "audio s/s": counted["audio"] / seconds,
            "padding efficiency": counted["useful"] / max(counted["padded"], 1), "peak memory GiB": peak,
            "validation UA": metrics["ua"], "steps": trainer.state.global_step, "data wait": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--utterances-per-session", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="emotrain-trainer-bench-") as tmp:
        work = Path(tmp)
        corpus = synthetic_prepared(work, args.utterances_per_session)  # IEMOCAP's durations (scale 1)
        results = {
            "emotrain, bucketed (<= 80 s padded, <= 8)": emotrain_run(corpus, work / "bucket", args.epochs,
                                                                      ["data.max_batch_audio_seconds=80",
                                                                       "train.batch_size=8"]),
            "emotrain, fixed 8": emotrain_run(corpus, work / "fixed", args.epochs,
                                              ["data.batching=fixed", "train.batch_size=8"]),
            "Trainer, group_by_length (lengths precomputed)": trainer_run(corpus, work / "t-grouped", args.epochs, True),
            "Trainer, random batches of 8": trainer_run(corpus, work / "t-random", args.epochs, False),
        }
    best_trainer = max(r["utterances/s"] for name, r in results.items() if name.startswith("Trainer"))
    print(f"| run ({args.epochs} epochs) | utterances/s | audio s/s | padding eff. | peak GiB | validation UA | steps "
          "| waiting for data | vs best Trainer |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        peak = f"{r['peak memory GiB']:.2f}" if r["peak memory GiB"] else "-"
        wait = "-" if r["data wait"] is None else f"{r['data wait']:.0%}"
        print(f"| {name} | {r['utterances/s']:.1f} | {r['audio s/s']:.1f} | {r['padding efficiency']:.2f} | {peak} | "
              f"{r['validation UA']:.3f} | {r['steps']} | {wait} | {r['utterances/s'] / best_trainer:.2f}x |")


if __name__ == "__main__":
    main()
