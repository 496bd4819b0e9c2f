"""Training memory: peak with and without activation checkpointing, DDP against ZeRO-2, and the
largest audio budget per batch that fits a given memory.

    python bench/memory.py                    # CPU: peak resident memory of rank 0 (getrusage)
    python bench/memory.py --memory-gib 60    # on a GPU the same figures are the allocator's peak

Every row is a real `emotrain train` (configs/smoke.yaml, random encoders of --width x --layers on both
sides, so parameters, optimizer state and activations all weigh) for --steps optimizer steps over the
synthetic corpus; the figure is the recipe's own telemetry (`perf/peak_memory_gib` on a GPU,
`perf/peak_host_memory_gib` on a CPU). On a CPU, resident memory includes the interpreter and its
libraries: the table gives that baseline, measured in a process that imports the same modules, and
each row's figure above it. The padded audio of the largest batch the run trained on comes from the
epoch plan (a pure function of the data: the batches the run really had).

The budget sweep fits peak = fixed + per-second x padded seconds (least squares over the budgets, with
and without checkpointing) and solves it for --memory-gib: the largest `data.max_batch_audio_seconds`
that fits, a prediction the table then checks with a run at that budget when it is within --max-check.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, synthetic_prepared, train  # noqa: E402

ON = {False: "no checkpointing", True: "checkpointing"}
PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
BASELINE = ("import resource, torch, transformers, accelerate, datasets, emotrain.train.recipe; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)")


def model_overrides(width: int, layers: int) -> list[str]:
    return ["model.audio_encoder=tiny", "model.text_encoder=tiny", f"model.tiny_hidden_size={width}",
            f"model.tiny_layers={layers}", f"model.hidden_size={width}", f"model.classifier_hidden_size={width}",
            "model.cross_attention_heads=4", "model.freeze_feature_encoder=false"]


def largest_batch_seconds(overrides: list[str], steps: int, processes: int) -> float:
    """Padded audio seconds of the largest batch rank 0 trains on in the first `steps` steps."""
    from emotrain.config import load_config
    from emotrain.data.audio import cropped_seconds
    from emotrain.data.folds import split_from_config
    from emotrain.data.plan import StreamSettings, plan_epoch

    cfg = load_config(REPO / "configs/smoke.yaml", overrides)
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    settings = StreamSettings.from_config(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    plan = plan_epoch(split, settings, processes, epoch=0)[0]
    seconds = cropped_seconds(split.meta.duration, cfg.data.max_audio_seconds)
    return max(len(b) * float(seconds[b].max()) for b in (plan.batch(p) for p in range(min(steps, len(plan)))))


def measure(corpus: Path, out: Path, args, *, budget: float, checkpointing: bool = False, processes: int = 1,
            launch: str = "ddp", precision: str | None = None) -> dict:
    overrides = [f"data.path={corpus}", f"output_dir={out}", f"train.max_steps={args.steps}", "train.max_epochs=100",
                 *model_overrides(args.width, args.layers), f"data.max_batch_audio_seconds={budget}",
                 "data.max_audio_seconds=15", "train.batch_size=64", "data.num_workers=0",
                 f"train.gradient_checkpointing={str(checkpointing).lower()}", f"train.mixed_precision={precision or args.precision}",
                 "train.checkpoint_every_steps=0", "train.early_stopping_patience=0", "train.eval_every_steps=0",
                 "logging.progress_bar=false", "logging.log_every_steps=1", "logging.report_to=[]"]
    rows = train(overrides, processes=processes, launch=launch)
    device = [r["perf/peak_memory_gib"] for r in rows if "perf/peak_memory_gib" in r]
    host = [r["perf/peak_host_memory_gib"] for r in rows if "perf/peak_host_memory_gib" in r]
    return {"peak": max(device or host), "kind": "device" if device else "host",
            "batch_seconds": largest_batch_seconds(overrides, args.steps, processes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=40.0, help="audio seconds per batch of the main rows")
    parser.add_argument("--sweep", default="20,40,80", help="budgets of the fit (comma-separated seconds)")
    parser.add_argument("--memory-gib", type=float, default=2.0, help="the memory the largest budget must fit in")
    parser.add_argument("--max-check", type=float, default=160.0, help="check the prediction by a run up to this")
    parser.add_argument("--precision", default="no", help="train.mixed_precision of the single-process rows")
    parser.add_argument("--utterances-per-session", type=int, default=40)
    args = parser.parse_args()

    baseline = float(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                    check=True).stdout)
    rows: list[tuple[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="emotrain-memory-bench-") as tmp:
        work = Path(tmp)
        corpus = synthetic_prepared(work, args.utterances_per_session)
        runs = iter(range(1000))

        def run(label: str, **kw) -> dict:
            result = measure(corpus, work / f"run{next(runs)}", args, **kw)
            rows.append((label, result))
            print(f"{label}: {result}", file=sys.stderr, flush=True)
            return result

        for checkpointing in (False, True):
            run(f"1 process, {PRECISION[args.precision]}, {ON[checkpointing]}", budget=args.budget, checkpointing=checkpointing)
        for launch in ("ddp", "zero2"):
            run(f"2 processes, bf16, {launch}", budget=args.budget, processes=2, launch=launch, precision="bf16")
        fits = {}
        for checkpointing in (False, True):
            points = [run(f"1 process, {PRECISION[args.precision]}, {ON[checkpointing]}, budget {b:g} s",
                          budget=b, checkpointing=checkpointing)
                      for b in map(float, args.sweep.split(","))]
            x = np.array([p["batch_seconds"] for p in points])
            y = np.array([p["peak"] for p in points])
            per_second, fixed = np.polyfit(x, y, 1)
            fits[checkpointing] = (fixed, per_second, (args.memory_gib - fixed) / per_second if per_second > 0 else None)
        checks = {}
        for checkpointing, (_, _, largest) in fits.items():
            if largest is not None and 0 < largest <= args.max_check:
                checks[checkpointing] = run(f"check: budget {largest:.0f} s, {ON[checkpointing]}",
                                            budget=round(largest), checkpointing=checkpointing)

    kind = rows[0][1]["kind"]
    print(f"\nPeak {'device (allocator)' if kind == 'device' else 'resident host'} memory of rank 0, "
          f"encoders {args.width} wide x {args.layers} layers, {args.steps} steps each.")
    if kind == "host":
        print(f"Baseline (interpreter + libraries, no model): {baseline:.2f} GiB.\n")
    print("| run | largest batch (padded audio s) | peak GiB | above baseline GiB |")
    print("| --- | ---: | ---: | ---: |")
    for label, r in rows:
        above = f"{r['peak'] - baseline:.2f}" if kind == "host" else "-"
        print(f"| {label} | {r['batch_seconds']:.1f} | {r['peak']:.2f} | {above} |")
    print(f"\nLargest audio budget per batch within {args.memory_gib:g} GiB (fit over budgets {args.sweep}):\n")
    print("| checkpointing | fixed GiB | GiB per padded audio second | largest budget (s) | checked: peak GiB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for checkpointing, (fixed, per_second, largest) in fits.items():
        check = checks.get(checkpointing)
        print(f"| {ON[checkpointing]} | {fixed:.2f} | {per_second:.4f} | {largest:.0f} | "
              f"{check['peak']:.2f} |" if largest is not None and check else
              f"| {ON[checkpointing]} | {fixed:.2f} | {per_second:.4f} | {largest if largest is None else round(largest)} | - |")


if __name__ == "__main__":
    main()
