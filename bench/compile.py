"""torch.compile on the training step: what compiling costs, how often it recompiles, what a step gains.

    python bench/compile.py                     # inductor, tiny encoders, the real training stream
    python bench/compile.py --backend eager     # dynamo's graph capture alone (a quick check)
    python bench/compile.py --width 1024 --layers 24 --device cuda   # on a GPU

One training step is emotrain's: the EmotionModel's forward, the per-utterance loss, backward, AdamW,
over the training stream's real batches (synthetic corpus, duration buckets, 15 s crops) in the order
the recipe would train them. Each configuration runs in a process of its own (dynamo's caches are
per process):

- eager: no compile (the reference);
- dynamic: `torch.compile(dynamic=True)`, batches padded to their longest (every batch a new shape);
- dynamic + ladder: the same, batches padded to `data.length_ladder=4` (a few shapes);
- static + ladder: `dynamic=False`, which needs one graph per (batch size, audio length, text length):
  dynamo stops recompiling after its recompile limit (8) and runs the rest eagerly;
- automatic (+ ladder): torch.compile's default (`dynamic=None`): the first shape compiles static,
  a shape that differs recompiles with the changed sizes symbolic. `accelerate launch --dynamo_backend
  inductor` without `--dynamo_use_dynamic` gives this one; with it, "dynamic".

Printed per configuration: seconds of the first step (the first compile), seconds spent compiling in
all (every step minus the steady step time), graphs compiled, distinct batch shapes met, steady seconds
per step (median over the second half) and the speed-up over eager. Distinct shapes count (batch size,
audio length, text length); in brackets the (audio, text) lengths alone: the ladder bounds those, while
duration buckets still vary the batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, synthetic_prepared  # noqa: E402

CONFIGS = {
    "eager": {"compile": None, "ladder": 0},
    "dynamic": {"compile": {"dynamic": True}, "ladder": 0},
    "dynamic + ladder": {"compile": {"dynamic": True}, "ladder": 4},
    "static + ladder": {"compile": {"dynamic": False}, "ladder": 4},
    "automatic": {"compile": {}, "ladder": 0},
    "automatic + ladder": {"compile": {}, "ladder": 4},
}


def one(args) -> dict:
    """Runs one configuration (in this process) and returns its figures."""
    import torch
    from torch._dynamo.utils import counters

    from emotrain.config import load_config
    from emotrain.data.folds import split_from_config
    from emotrain.data.stream import build_train_stream
    from emotrain.model import build_model, build_processors
    from emotrain.train.evaluation import model_inputs
    from emotrain.train.loss import utterance_losses

    config = CONFIGS[args.one]
    cfg = load_config(REPO / "configs/smoke.yaml", [
        f"data.path={args.corpus}", "output_dir=/tmp/unused", "model.audio_encoder=tiny", "model.text_encoder=tiny",
        f"model.tiny_hidden_size={args.width}", f"model.tiny_layers={args.layers}", "model.freeze_feature_encoder=true",
        "data.max_audio_seconds=15", f"data.length_ladder={config['ladder']}", "data.num_workers=0"])
    torch.manual_seed(0)
    device = torch.device(args.device)
    split = split_from_config(cfg.data, seed=cfg.train.seed)
    feature_extractor, tokenizer = build_processors(cfg.model)
    stream = build_train_stream(cfg, split, feature_extractor=feature_extractor, tokenizer=tokenizer)
    batches, epoch = [], 0
    while len(batches) < args.steps:
        stream.set_epoch(epoch)
        batches.extend(stream)
        epoch += 1
    batches = batches[: args.steps]
    model = build_model(cfg.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_model = model if config["compile"] is None else torch.compile(model, backend=args.backend,
                                                                       **config["compile"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for batch in batches:
        started = time.perf_counter()
        logits = step_model(**model_inputs(batch, device)).logits
        utterance_losses(logits, batch["labels"].to(device)).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - started)
    steady = statistics.median(times[len(times) // 2:])
    shapes = {(tuple(b["input_values"].shape), tuple(b["input_ids"].shape)) for b in batches}
    lengths = {(s[0][1], s[1][1]) for s in shapes}
    return {"first": times[0], "compiling": sum(max(t - steady, 0.0) for t in times), "steady": steady,
            "graphs": counters["stats"]["unique_graphs"], "shapes": len(shapes), "lengths": len(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of: " + ", ".join(CONFIGS))
    parser.add_argument("--utterances-per-session", type=int, default=40)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="emotrain-compile-bench-") as tmp:
        corpus = synthetic_prepared(Path(tmp), args.utterances_per_session)
        for name in args.configs.split(","):
            command = [sys.executable, __file__, "--one", name, "--corpus", str(corpus), "--backend", args.backend,
                       "--device", args.device, "--steps", str(args.steps), "--width", str(args.width),
                       "--layers", str(args.layers)]
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:  # a compiler error is a result too: the table says which
                errors = [line for line in proc.stderr.splitlines() if "Error" in line and not line.startswith(" ")]
                results[name] = {"error": errors[-1] if errors else proc.stderr.strip().splitlines()[-1]}
                print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    eager = results.get("eager", {}).get("steady")
    print(f"\nbackend {args.backend}, device {args.device}, encoders {args.width} wide x {args.layers} layers, "
          f"{args.steps} training steps over the stream's batches\n")
    print("| configuration | first step s | compiling in all s | graphs | distinct shapes (lengths) | steady s/step "
          "| vs eager |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:150]} | | | | | |")
            continue
        gain = f"{eager / r['steady']:.2f}x" if eager else "-"
        print(f"| {name} | {r['first']:.1f} | {r['compiling']:.1f} | {r['graphs']} | {r['shapes']} | "
              f"{r['steady']:.3f} | {gain} |")


if __name__ == "__main__":
    main()
