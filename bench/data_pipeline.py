"""Data pipeline figures: padding efficiency of batching strategies, and decode throughput.

    .venv/bin/python bench/data_pipeline.py                 # full run (~15 s on 2 CPU cores)
    .venv/bin/python bench/data_pipeline.py --utterances 60 # quicker

1. Padding efficiency (useful / padded audio samples) on 5,531 durations drawn like IEMOCAP's
   4-class set (lognormal, median 3.58 s, mean 4.55 s, clipped to [0.59, 34.14] s), cropped at
   15 s as training does, batched by the planner the training stream uses. No audio involved.
2. Throughput from prepared Parquet shards written here (FLAC, IEMOCAP-shaped durations):
   soundfile decode alone, then the full training stream (row-group reads with pyarrow, decode,
   crop, tokenise, feature-extract, collate) with 0 and 2 DataLoader workers; and the cost of
   planning an epoch / restoring a mid-epoch state (metadata only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotrain.data.audio import cropped_seconds, decode_audio  # noqa: E402
from emotrain.data.batching import (  # noqa: E402
    bucket_batches,
    fixed_batches,
    plan_padding_efficiency,
    shuffle_buffer_order,
)
from emotrain.data.folds import make_fold_split, read_parquet  # noqa: E402
from emotrain.data.plan import StreamSettings  # noqa: E402
from emotrain.data.stream import TrainStream  # noqa: E402
from tests.toyset import (  # noqa: E402
    iemocap_like_durations,
    toy_processors,
    write_toy_prepared,
)


def padding_table(seed: int, crop: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    seconds = cropped_seconds(iemocap_like_durations(5531, rng), crop)
    items = np.arange(len(seconds))
    rows = []

    def add(name, batches):
        sizes = [len(b) for b in batches]
        rows.append(
            {
                "strategy": name,
                "efficiency": plan_padding_efficiency(batches, seconds),
                "batches": len(batches),
                "mean_size": float(np.mean(sizes)),
                "max_padded_s": float(max(len(b) * seconds[b].max() for b in batches)),
            }
        )

    def shuffled():
        return shuffle_buffer_order(items, 512, np.random.default_rng(seed + 1))

    for size in (8, 16):
        add(f"fixed, batch {size} (shuffle buffer 512)", fixed_batches(shuffled(), size))
    for buffer in (64, 256, 1024):
        order = shuffled()
        add(
            f"bucketed, buffer {buffer}, <= 80 s padded, <= 8 utts",
            bucket_batches(order, seconds[order], buffer_size=buffer, max_batch_seconds=80.0, max_batch_size=8,
                           rng=np.random.default_rng(seed + 2)),
        )
    order = shuffled()
    add(
        "bucketed, buffer 256, <= 80 s padded, no size cap",
        bucket_batches(order, seconds[order], buffer_size=256, max_batch_seconds=80.0, max_batch_size=None,
                       rng=np.random.default_rng(seed + 2)),
    )
    sorted_items = np.argsort(seconds, kind="stable")
    add("evaluation: sorted by duration, batch 8", fixed_batches(sorted_items, 8))
    return rows


def throughput(utterances_per_session: int, workdir: Path, workers_counts: tuple[int, ...] = (0, 2)) -> dict:
    root = write_toy_prepared(workdir / "prepared", per_session=utterances_per_session, num_shards=8,
                              durations="iemocap", seed=0)
    split = make_fold_split(str(root), 1, seed=0)
    fe, tok = toy_processors()
    out: dict = {"train_utterances": split.num_train}

    # soundfile decode alone (one process), over the training shards' bytes.
    blobs = []
    for url in split.train_files:
        table = read_parquet(url, ["audio"])
        blobs += [a["bytes"] for a in table.column("audio").to_pylist()]
    t = time.perf_counter()
    seconds = sum(len(decode_audio(b, 16000)) for b in blobs) / 16000
    dt = time.perf_counter() - t
    out["decode_only"] = {"utts_per_s": len(blobs) / dt, "audio_s_per_s": seconds / dt, "utts": len(blobs)}

    settings = StreamSettings(seed=0, batch_size=8)  # the defaults: bucketed, 80 s, crop 15 s
    for workers in workers_counts:
        stream = TrainStream(split, settings, feature_extractor=fe, tokenizer=tok, num_workers=workers)
        list(TrainStream(split, settings, feature_extractor=fe, tokenizer=tok).plan(0).batches)  # warm imports
        t = time.perf_counter()
        utts, audio, padded = 0, 0.0, 0.0
        for batch in stream:
            utts += len(batch["ids"])
            audio += batch["audio_seconds"]
            padded += batch["padded_audio_seconds"]
        dt = time.perf_counter() - t
        out[f"stream_workers_{workers}"] = {
            "utts_per_s": utts / dt,
            "audio_s_per_s": audio / dt,
            "per_worker_utts_per_s": utts / dt / max(1, workers),
            "padding_efficiency": audio / padded,
            "seconds": dt,
            "batches": stream.position,
        }

    # Planning an epoch and restoring a mid-epoch state: metadata only.
    stream = TrainStream(split, settings, feature_extractor=fe, tokenizer=tok)
    t = time.perf_counter()
    for epoch in range(10):
        stream.plan(epoch)
    out["plan_epoch_ms"] = (time.perf_counter() - t) / 10 * 1000
    stream.set_epoch(0)
    half = stream.num_batches() // 2
    it = iter(stream)
    for _ in range(half):
        next(it)
    state = stream.state_dict()
    it.close()
    resumed = TrainStream(split, settings, feature_extractor=fe, tokenizer=tok)
    t = time.perf_counter()
    resumed.load_state_dicts([state])
    next(iter(resumed))
    out["resume_first_batch_ms"] = (time.perf_counter() - t) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=float, default=15.0)
    parser.add_argument("--utterances", type=int, default=300, help="per session, for the throughput part")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    print(f"# data pipeline bench  ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()})\n")
    rows = padding_table(args.seed, args.crop)
    print(f"## Padding efficiency: 5,531 IEMOCAP-shaped durations, crop {args.crop:g} s\n")
    print("| batching | padding efficiency | batches | mean utts/batch | max padded s/batch |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['strategy']} | {r['efficiency']:.3f} | {r['batches']} | {r['mean_size']:.2f} | {r['max_padded_s']:.1f} |")

    with tempfile.TemporaryDirectory() as tmp:
        tp = throughput(args.utterances, Path(tmp))
    print(f"\n## Throughput: fold 1 of a prepared set ({tp['train_utterances']} training utterances, "
          "IEMOCAP-shaped durations, FLAC, 8 shards/session)\n")
    print("| stage | utterances/s | audio s/s | per worker utts/s | padding eff. |")
    print("| --- | ---: | ---: | ---: | ---: |")
    d = tp["decode_only"]
    print(f"| soundfile decode only (1 process) | {d['utts_per_s']:.0f} | {d['audio_s_per_s']:.0f} | {d['utts_per_s']:.0f} | - |")
    for w in (0, 2):
        s = tp[f"stream_workers_{w}"]
        print(f"| training stream, num_workers={w} | {s['utts_per_s']:.0f} | {s['audio_s_per_s']:.0f} | "
              f"{s['per_worker_utts_per_s']:.0f} | {s['padding_efficiency']:.3f} |")
    print(f"\nplanning one epoch (metadata only): {tp['plan_epoch_ms']:.1f} ms; "
          f"restoring a mid-epoch state to the first batch: {tp['resume_first_batch_ms']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"padding": rows, "throughput": tp}, indent=2))


if __name__ == "__main__":
    main()
