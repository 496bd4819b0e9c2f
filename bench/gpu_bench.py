"""The paper's configuration at paper size on one GPU, in bf16: what a training step costs.

    python bench/gpu_bench.py --out results.md              # on the GPU (bench/gpu.sh sets it up)
    python bench/gpu_bench.py --tiny --device cpu --steps 3 # the same script, checked on a CPU

Model: fusion (cross-modal attention both ways, statistics pooling) over a Wav2Vec2-large-sized
audio encoder (24 layers, width 1024, layer norm: it takes an attention mask) and a BERT-base-sized
text encoder (12 layers, width 768), random weights (no hub here), feature encoder frozen as for a
pretrained model. Batches: utterances with IEMOCAP's duration shape (lognormal, median 3.6 s,
clipped to [0.6, 34] s, cropped at 15 s) and 8-40 tokens of text, built two ways from the same
utterances: duration buckets under a padded-audio budget (emotrain's plan functions), and the HF
Trainer's `LengthGroupedSampler` with batches of 8. Everything runs through emotrain's own pieces
(`EmotionModel`, the per-utterance loss, `finish_optimizer_step`) under Accelerate; the Trainer row
runs `transformers.Trainer` itself on the grouped batches.

Printed (and written to --out): the measured bf16 matmul peak; per configuration utterances/s,
audio seconds/s, padding efficiency, achieved TFLOP/s (FLOPs per utterance counted once with
FlopCounterMode, backward = 2x forward) and its share of the peak, peak memory; with and without
activation checkpointing; then a torch.profiler table of one step's top costs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emotrain.config import ModelConfig  # noqa: E402


def paper_size_model(tiny: bool):
    """A fusion EmotionModel with random encoders of the paper's sizes (or tiny ones for a CPU check)."""
    from transformers import BertConfig, Wav2Vec2Config

    from emotrain.model import EmotionModel

    if tiny:
        audio = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="layer",
                               do_stable_layer_norm=True, mask_time_prob=0.0, layerdrop=0.0)
        text = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)
    else:
        audio = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                               feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                               mask_time_prob=0.0, layerdrop=0.0)  # wav2vec2-large-lv60's shape
        text = BertConfig()  # bert-base-uncased's shape
    config = ModelConfig(variant="fusion", audio_encoder="facebook/wav2vec2-large-lv60", text_encoder="bert-base-uncased",
                         freeze_feature_encoder=True, hidden_size=256, cross_attention_heads=8, classifier_hidden_size=256)
    return EmotionModel(config, audio_encoder_config=audio, text_encoder_config=text)


def utterances(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(seconds [n] cropped at 15 s, tokens [n]) shaped like IEMOCAP's 4-class set."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(3.58), 0.62, n), 0.59, 34.14)
    return np.minimum(seconds, 15.0), rng.integers(8, 41, n)


def bucketed(seconds: np.ndarray, budget: float, cap: int, seed: int = 0) -> list[np.ndarray]:
    from emotrain.data.batching import bucket_batches

    return bucket_batches(np.arange(len(seconds)), seconds, buffer_size=256, max_batch_seconds=budget,
                          max_batch_size=cap, rng=np.random.default_rng(seed))


def trainer_grouped(seconds: np.ndarray, size: int, seed: int = 0) -> list[np.ndarray]:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    torch.manual_seed(seed)
    order = list(LengthGroupedSampler(size, lengths=(seconds * 16000).astype(int).tolist()))
    return [np.array(order[i:i + size]) for i in range(0, len(order), size)]


def make_batch(indices: np.ndarray, seconds: np.ndarray, tokens: np.ndarray, device) -> dict:
    lengths = (seconds[indices] * 16000).astype(np.int64)
    width, words = int(lengths.max()), int(tokens[indices].max())
    audio = torch.randn(len(indices), width) * (torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None])
    ids = torch.randint(1000, 30000, (len(indices), words))
    mask = (torch.arange(words)[None, :] < torch.from_numpy(tokens[indices])[:, None]).long()
    return {"input_values": audio.to(device), "audio_lengths": torch.from_numpy(lengths).to(device),
            "input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": torch.randint(0, 4, (len(indices),), device=device),
            "useful": float(lengths.sum()), "padded": float(len(indices) * width)}


def run_emotrain(model, batches, seconds, tokens, device, precision, steps, checkpointing, flops, peak):
    """Train `steps` steps through emotrain's pieces; returns the row of figures."""
    from accelerate import Accelerator

    from emotrain.train.loss import micro_batch_loss, utterance_losses
    from emotrain.train.step import finish_optimizer_step

    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    model.set_gradient_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    prepared, optimizer = accelerator.prepare(model, optimizer)
    prepared.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    done = {"utterances": 0, "useful": 0.0, "padded": 0.0}
    warmup = min(3, max(steps // 3, 1))
    started = None
    for k in range(warmup + steps):
        if k == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        batch = make_batch(batches[k % len(batches)], seconds, tokens, device)
        logits = prepared(**{key: batch[key] for key in ("input_values", "audio_lengths", "input_ids",
                                                         "attention_mask")}).logits
        losses = utterance_losses(logits, batch["labels"])
        accelerator.backward(micro_batch_loss(losses, len(batch["labels"]), world_size=1, accumulation=1))
        norm = accelerator.clip_grad_norm_(prepared.parameters(), 1.0)
        finish_optimizer_step(accelerator, optimizer, norm, stop_requested=False)
        if k >= warmup:
            done["utterances"] += len(batch["labels"])
            done["useful"] += batch["useful"]
            done["padded"] += batch["padded"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    achieved = 3 * flops * done["utterances"] / elapsed
    return {"utterances/s": done["utterances"] / elapsed, "audio s/s": done["useful"] / 16000 / elapsed,
            "padding efficiency": done["useful"] / done["padded"], "TFLOP/s": achieved / 1e12,
            "share of peak": achieved / peak,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def run_trainer(model, batches, seconds, tokens, device, precision, steps, flops, peak):
    """`transformers.Trainer` on the same grouped batches (its own loop, optimizer step and clipping)."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    flat = [i for b in batches for i in b.tolist()]

    class Synthetic(Dataset):
        def __len__(self):
            return len(flat)

        def __getitem__(self, k):
            return {"index": flat[k]}

    def collate(examples):
        batch = make_batch(np.array([e["index"] for e in examples]), seconds, tokens, torch.device("cpu"))
        collate.useful += batch.pop("useful")
        collate.padded += batch.pop("padded")
        return batch

    collate.useful = collate.padded = 0.0
    clock = {}
    warmup = min(3, max(steps // 3, 1))

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                clock["start"] = time.perf_counter()
                collate.useful = collate.padded = 0.0
            if state.global_step == warmup + steps:
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock["end"] = time.perf_counter()

    class InOrder(Trainer):  # the grouped order is already in `flat`; keep it
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    size = len(batches[0])
    args = TrainingArguments(output_dir="/tmp/emotrain-gpu-bench-trainer", per_device_train_batch_size=size,
                             max_steps=warmup + steps, report_to=[], save_strategy="no", logging_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, bf16=precision == "bf16",
                             use_cpu=device.type == "cpu", dataloader_num_workers=0, learning_rate=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.set_gradient_checkpointing(False)
    trainer = InOrder(model=model, args=args, train_dataset=Synthetic(), data_collator=collate, callbacks=[Clock()])
    trainer.train()
    elapsed = clock["end"] - clock["start"]
    done = steps * size
    achieved = 3 * flops * done / elapsed
    return {"utterances/s": done / elapsed, "audio s/s": collate.useful / 16000 / elapsed,
            "padding efficiency": collate.useful / max(collate.padded, 1), "TFLOP/s": achieved / 1e12,
            "share of peak": achieved / peak,
            "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def profile_step(model, batch, device, precision) -> str:
    from accelerate import Accelerator
    from torch.profiler import ProfilerActivity, profile

    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    prepared = accelerator.prepare(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    inputs = {key: batch[key] for key in ("input_values", "audio_lengths", "input_ids", "attention_mask")}
    for _ in range(2):  # warm up
        accelerator.backward(prepared(**inputs).logits.float().sum())
    with profile(activities=activities) as prof:
        accelerator.backward(prepared(**inputs).logits.float().sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny encoders (a CPU check of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="measure every configuration this many times "
                        "in turn; the table shows the last round (the first warms the kernels up)")
    parser.add_argument("--budget", type=float, default=160.0, help="padded audio seconds per bucketed batch")
    parser.add_argument("--out", help="also write the tables here (Markdown)")
    args = parser.parse_args()

    from emotrain.train.telemetry import flops_per_utterance, matmul_peak_flops

    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "no"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    lines = [f"# GPU bench ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
             f"{'tiny check' if args.tiny else 'paper size'}, {precision})", ""]

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)
        if args.out:  # as it goes: a run cut by its time limit keeps what it measured
            Path(args.out).write_text("\n".join(lines) + "\n")

    peak = matmul_peak_flops(device, dtype, size=None if device.type == "cuda" else 512, seconds=1.0)
    say(f"measured {dtype} matmul peak: {peak / 1e12:.1f} TFLOP/s")
    seconds, tokens = utterances(512 if args.tiny else 4096)
    model = paper_size_model(args.tiny).to(device)
    flops = flops_per_utterance(model, None, _SyntheticTokenizer(), seconds=float(seconds.mean()),
                                tokens=int(tokens.mean()))
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, "
        f"{flops / 1e9:.1f} GFLOP forward per utterance of the mean length ({seconds.mean():.2f} s, {tokens.mean():.0f} tokens)")
    say()
    budget = args.budget if not args.tiny else 40.0
    plans = {
        f"emotrain, bucketed (<= {budget:g} s padded, <= 32)": bucketed(seconds, budget, 32),
        "emotrain, fixed 8 (random order)": [np.arange(len(seconds))[i:i + 8] for i in range(0, len(seconds), 8)],
        "emotrain, Trainer's grouped batches of 8": trainer_grouped(seconds, 8),
    }
    # Every configuration is measured `--rounds` times in turn and the table shows the last round: the
    # first one on a fresh GPU process pays for loading the kernels each new shape needs (lazy module
    # loading), which made the configurations measured first look up to 3x slower than the later ones.
    first_round = {}
    for _ in range(args.rounds):
        rows = {}
        for checkpointing in (False, True):
            for name, batches in plans.items():
                label = f"{name}{', checkpointing' if checkpointing else ''}"
                rows[label] = run_emotrain(model, batches, seconds, tokens, device, precision, args.steps,
                                           checkpointing, flops, peak)
        rows["HF Trainer, grouped batches of 8"] = run_trainer(
            model, plans["emotrain, Trainer's grouped batches of 8"], seconds, tokens, device, precision, args.steps,
            flops, peak)
        first_round = first_round or rows
    say("| configuration | utterances/s | audio s/s | padding eff. | TFLOP/s | share of peak | peak GiB |")
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        memory = f"{r['peak GiB']:.1f}" if r["peak GiB"] is not None else "-"
        say(f"| {label} | {r['utterances/s']:.1f} | {r['audio s/s']:.0f} | {r['padding efficiency']:.2f} | "
            f"{r['TFLOP/s']:.2f} | {r['share of peak']:.1%} | {memory} |")
    say()
    if args.rounds > 1:
        say(f"Round 1 of {args.rounds} (utterances/s, same order): "
            + "; ".join(f"{label}: {r['utterances/s']:.1f}" for label, r in first_round.items()) + ".")
        say()
    frozen_encoders(model, plans[next(iter(plans))], seconds, tokens, device, precision, args.steps, say)
    say()
    data_path(args, rows[next(iter(rows))]["utterances/s"], say)
    say()
    say("One bucketed training step (forward + backward), top costs:")
    say("```")
    say(profile_step(model, make_batch(plans[next(iter(plans))][0], seconds, tokens, device), device, precision))
    say("```")


def frozen_encoders(model, batches, seconds, tokens, device, precision, steps, say) -> None:
    """The frozen-encoder protocol (issue 20): what one epoch pays per utterance with the encoders run
    live (a no-grad forward of both encoders, then a training step of the head) against features read
    from a cache (the head's step alone), and how much a cache of hidden states weighs per utterance.
    The head step is the model's own layers (projection, cross-attention, pooling, classifier) on
    encoder outputs of the batch's shapes; reading the cache from disk is not counted here."""
    from accelerate import Accelerator

    from emotrain.model.masks import audio_frame_lengths, audio_sample_mask, lengths_to_mask, text_mask
    from emotrain.model.pooling import masked_mean_std
    from emotrain.train.loss import utterance_losses

    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    model.set_gradient_checkpointing(False)
    head = [p for name, p in model.named_parameters() if not name.startswith(("audio_encoder.", "text_encoder."))]
    optimizer = torch.optim.AdamW(head, lr=1e-4)
    model.train()

    def encode(batch):  # frozen encoders: [B, T, D_a] frames, [B, L, D_t] tokens, and their masks
        with torch.no_grad(), accelerator.autocast():
            lengths = batch["audio_lengths"]
            frames = model.audio_encoder(batch["input_values"],
                                         attention_mask=audio_sample_mask(lengths, batch["input_values"].shape[1]),
                                         output_hidden_states=True)
            words = model.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=True)
        frame_mask = lengths_to_mask(audio_frame_lengths(model.audio_encoder, lengths), frames.last_hidden_state.shape[1])
        return frames, frame_mask, words, text_mask(batch["attention_mask"])

    def head_step(frames, frame_mask, words, word_mask, labels):
        with accelerator.autocast():
            audio, text = model.cross_attention(model.audio_projection(frames), frame_mask,
                                                model.text_projection(words), word_mask)
            features = torch.cat([masked_mean_std(audio, frame_mask), masked_mean_std(text, word_mask)], dim=-1)
            logits = model.classifier(features.to(model.classifier[-1].weight.dtype))
        utterance_losses(logits, labels).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn) -> tuple[float, int]:
        warmup = min(3, max(steps // 3, 1))
        done, started = 0, None
        for k in range(warmup + steps):
            if k == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
            n = fn(batches[k % len(batches)])
            done += n if k >= warmup else 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        return done / (time.perf_counter() - started), done

    stored = {"frames": 0, "layers_audio": 0, "layers_text": 0, "words": 0, "utterances": 0}

    def live(indices):
        batch = make_batch(indices, seconds, tokens, device)
        frames, frame_mask, words, word_mask = encode(batch)
        stored["frames"] += int(frame_mask.sum())
        stored["words"] += int(word_mask.sum())
        stored["layers_audio"], stored["layers_text"] = len(frames.hidden_states), len(words.hidden_states)
        stored["utterances"] += len(indices)
        head_step(frames.last_hidden_state, frame_mask, words.last_hidden_state, word_mask, batch["labels"])
        return len(indices)

    cache = {}
    cache_dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def cached(indices):  # the features of the batch as a cache would hand them back (bf16 on the device)
        key = tuple(indices.tolist())
        if key not in cache:
            batch = make_batch(indices, seconds, tokens, device)
            frames, frame_mask, words, word_mask = encode(batch)
            cache[key] = (frames.last_hidden_state.to(cache_dtype), frame_mask,
                          words.last_hidden_state.to(cache_dtype), word_mask, batch["labels"])
        frames, frame_mask, words, word_mask, labels = cache[key]
        head_step(frames, frame_mask, words, word_mask, labels)
        return len(indices)

    live_rate, _ = timed(live)
    for indices in batches[:min(3, max(steps // 3, 1)) + steps]:  # fill the cache outside the clock
        cached(indices)
    cached_rate, _ = timed(cached)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    frames_per_utt = stored["frames"] / stored["utterances"]
    words_per_utt = stored["words"] / stored["utterances"]
    audio_width, text_width = model.audio_encoder.config.hidden_size, model.text_encoder.config.hidden_size
    last_layer_kib = (frames_per_utt * audio_width + words_per_utt * text_width) * 2 / 1024
    all_layers_kib = (frames_per_utt * audio_width * stored["layers_audio"]
                      + words_per_utt * text_width * stored["layers_text"]) * 2 / 1024
    say("Frozen encoders (issue 20's protocol), bucketed batches: one epoch's training per utterance")
    say()
    say("| frozen-encoder step | utterances/s | x live |")
    say("| --- | ---: | ---: |")
    say(f"| live: no-grad forward of both encoders + head step | {live_rate:.1f} | 1.0 |")
    say(f"| cached features ({str(cache_dtype).removeprefix('torch.')}, in device memory) + head step | {cached_rate:.1f} | {cached_rate / live_rate:.1f} |")
    say()
    say(f"A cache in bf16 weighs {last_layer_kib:.0f} KiB per utterance for the last layers "
        f"({frames_per_utt:.0f} frames x {audio_width} + {words_per_utt:.0f} tokens x {text_width}), "
        f"{all_layers_kib / 1024:.1f} MiB for every hidden state ({stored['layers_audio']} + {stored['layers_text']}"
        f" layers, what a weighted layer sum needs): {5531 * last_layer_kib / 2**20:.1f} / "
        f"{5531 * all_layers_kib / 2**20:.0f} GiB for IEMOCAP's 5,531 utterances.")


def data_path(args, step_utterances_per_second: float, say) -> None:
    """The real training stream (datasets streaming, FLAC decode, crop, tokenise, normalise, collate)
    on this machine's cores, per worker, and how many workers the measured GPU step needs."""
    import math
    import tempfile

    sys.path.insert(0, str(REPO / "bench"))
    from data_pipeline import throughput

    counts = (1, 2) if args.tiny else (1, 2, 4)
    with tempfile.TemporaryDirectory(prefix="emotrain-gpu-data-") as tmp:
        figures = throughput(40 if args.tiny else 300, Path(tmp), workers_counts=counts)
    say("| training stream (IEMOCAP-shaped FLAC shards, defaults) | utterances/s | per worker |")
    say("| --- | ---: | ---: |")
    for workers in counts:
        f = figures[f"stream_workers_{workers}"]
        say(f"| num_workers={workers} | {f['utts_per_s']:.0f} | {f['per_worker_utts_per_s']:.0f} |")
    per_worker = figures[f"stream_workers_{counts[0]}"]["per_worker_utts_per_s"]
    say(f"The bucketed step above trains {step_utterances_per_second:.0f} utterances/s: it needs "
        f"{math.ceil(step_utterances_per_second / per_worker)} worker(s) at {per_worker:.0f} utterances/s each.")


class _SyntheticTokenizer:
    """Stands in for a tokenizer in the FLOP count: `tokens` ids, all real."""

    def __call__(self, text, return_tensors=None, truncation=None, max_length=None):
        n = max_length or 16
        return {"input_ids": torch.randint(1000, 30000, (1, n)), "attention_mask": torch.ones(1, n, dtype=torch.long)}


if __name__ == "__main__":
    main()
