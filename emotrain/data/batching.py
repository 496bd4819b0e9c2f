"""Batch planning on metadata (shuffle buffer, duration buckets, fixed size) and the collate step.

Planning never touches audio: it works on durations (crop-aware: `min(duration, max_audio_seconds)`)
so a whole epoch's batches can be computed, or replayed on resume, in milliseconds. Decoding,
tokenising and collating then happen per planned batch (`Collator`).

The batch format, the contract with the model and the recipe:

    input_values         float32 [B, T]  per-utterance normalised audio, zero padded after the end
    audio_lengths        long    [B]     valid samples of each row of input_values
    input_ids            long    [B, L]  WordPiece ids, truncated to data.max_text_tokens
    attention_mask       long    [B, L]  1 on real tokens
    labels               long    [B]     indices into the dataset's label set (IEMOCAP: LABEL_NAMES)
    ids                  list[str]       utterance ids (bookkeeping, not a tensor)
    audio_seconds        float           sum of the real (cropped) durations in the batch
    padded_audio_seconds float           B x padded length, i.e. what the encoder really processes
    valid                bool    [B]     False where the audio failed to decode (a short silence stands
                                         in; it weighs nothing in the loss and is left out of metrics)
    num_valid            int             how many rows are valid (host-side bookkeeping)

`TENSOR_KEYS` lists the tensor entries (move those to the device); `padding_efficiency(batch)` is
audio_seconds / padded_audio_seconds.

Batches are padded to their longest utterance, or with `data.length_ladder` (rungs per octave) up to a
ladder of lengths (`ladder_length`): a few distinct shapes instead of one per batch, for a compiled
model (each new shape compiles anew). The plan counts the padded length against its budgets.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from transformers import Wav2Vec2FeatureExtractor

from emotrain.config import SAMPLING_RATE

TENSOR_KEYS = ("input_values", "audio_lengths", "input_ids", "attention_mask", "labels")
"""Entries of a batch that are tensors for the model (evaluation batches add `valid`)."""
AUDIO_QUANTUM = 320
"""Audio ladder rungs are multiples of one Wav2Vec2 frame (20 ms at 16 kHz)."""
TEXT_QUANTUM = 8
"""Text ladder rungs are multiples of 8 tokens."""


def ladder_length(n: int, quantum: int, rungs_per_octave: int, cap: int | None = None) -> int:
    """`n` padded up to the ladder `quantum * ceil(2 ** (k / rungs_per_octave))`, k = 0, 1, ...
    (at most `cap`, itself a rung: the crop or the token limit); `rungs_per_octave=0`: `n` itself."""
    if rungs_per_octave <= 0 or n <= 0:
        return n
    k = max(0, math.floor(rungs_per_octave * math.log2(max(n / quantum, 1.0))))
    while quantum * math.ceil(2 ** (k / rungs_per_octave)) < n:
        k += 1
    rung = quantum * math.ceil(2 ** (k / rungs_per_octave))
    return max(n, min(rung, cap)) if cap is not None else rung


def ladder_seconds(seconds: np.ndarray, rungs_per_octave: int, sampling_rate: int,
                   cap_seconds: float | None = None) -> np.ndarray:
    """Durations padded up to the audio ladder (what a batch of them pads to), for planning."""
    if rungs_per_octave <= 0:
        return seconds
    cap = None if cap_seconds is None else int(round(cap_seconds * sampling_rate))
    samples = np.ceil(np.asarray(seconds, dtype=np.float64) * sampling_rate).astype(np.int64)
    padded = [ladder_length(int(n), AUDIO_QUANTUM, rungs_per_octave, cap) for n in samples]
    return np.asarray(padded, dtype=np.float64) / sampling_rate


# ---------------------------------------------------------------------------------------------
# Planning on metadata.


def shuffle_buffer_order(items: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of `buffer_size` emits `items` in.

    The usual algorithm (as in `datasets`): fill the buffer; then each incoming item replaces a
    random slot whose item is emitted; at the end the buffer is shuffled and emitted. Memory of the
    real stream is bounded by the buffer, yet the order is a pure function of (items, rng).
    """
    items = np.asarray(items)
    if buffer_size <= 1 or len(items) <= 1:
        return items.copy()
    out = np.empty_like(items)
    buffer = list(items[:buffer_size])
    n_out = 0
    draws = rng.integers(0, buffer_size, size=max(0, len(items) - buffer_size))
    for item, slot in zip(items[buffer_size:], draws):
        out[n_out] = buffer[slot]
        n_out += 1
        buffer[slot] = item
    rest = np.array(buffer, dtype=items.dtype)
    rng.shuffle(rest)
    out[n_out:] = rest
    return out


def cut_sorted(
    seconds: np.ndarray, max_batch_seconds: float | None, max_batch_size: int | None
) -> list[np.ndarray]:
    """Cut positions 0..n-1 (already sorted by ascending `seconds`) into consecutive batches.

    A batch grows while (size + 1) x longest <= max_batch_seconds and size < max_batch_size; an
    utterance longer than the budget alone makes a batch of one.
    """
    batches: list[np.ndarray] = []
    start = 0
    n = len(seconds)
    for i in range(1, n + 1):
        if i == n:
            batches.append(np.arange(start, n))
            break
        size = i - start + 1  # if item i joined
        over_budget = max_batch_seconds is not None and size * seconds[i] > max_batch_seconds
        over_size = max_batch_size is not None and size > max_batch_size
        if over_budget or over_size:
            batches.append(np.arange(start, i))
            start = i
    return batches


def bucket_batches(
    items: np.ndarray,
    seconds: np.ndarray,
    *,
    buffer_size: int,
    max_batch_seconds: float | None,
    max_batch_size: int | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Duration-bucketed dynamic batches over a stream of `items` (with aligned `seconds`).

    Each run of `buffer_size` consecutive items is sorted by duration, cut into batches bounded by
    the padded-seconds budget and/or the size cap, and the buffer's batches are shuffled.
    """
    if max_batch_seconds is None and max_batch_size is None:
        raise ValueError("bucketing needs max_batch_seconds and/or max_batch_size")
    items = np.asarray(items)
    seconds = np.asarray(seconds, dtype=np.float64)
    batches: list[np.ndarray] = []
    for start in range(0, len(items), max(1, buffer_size)):
        chunk_items = items[start : start + buffer_size]
        chunk_seconds = seconds[start : start + buffer_size]
        order = np.argsort(chunk_seconds, kind="stable")
        cuts = cut_sorted(chunk_seconds[order], max_batch_seconds, max_batch_size)
        for k in rng.permutation(len(cuts)):
            batches.append(chunk_items[order[cuts[k]]])
    return batches


def fixed_batches(items: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of `batch_size` (the last one may be smaller)."""
    items = np.asarray(items)
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def plan_padding_efficiency(batches: Sequence[np.ndarray], seconds_of: np.ndarray) -> float:
    """Useful / padded audio of planned batches; `seconds_of[item]` is an item's (cropped) duration."""
    useful = padded = 0.0
    for batch in batches:
        if len(batch) == 0:
            continue
        s = seconds_of[np.asarray(batch)]
        useful += float(s.sum())
        padded += float(len(s) * s.max())
    return useful / padded if padded else 1.0


def padding_efficiency(batch: dict[str, Any] | Sequence[dict[str, Any]]) -> float:
    """audio_seconds / padded_audio_seconds of one collated batch or summed over several."""
    batches = [batch] if isinstance(batch, dict) else list(batch)
    useful = sum(b["audio_seconds"] for b in batches)
    padded = sum(b["padded_audio_seconds"] for b in batches)
    return useful / padded if padded else 1.0


# ---------------------------------------------------------------------------------------------
# Collate: decoded examples -> the batch format above.


class Collator:
    """Turn decoded examples into a batch.

    Each example is a dict with `id` (str), `array` (float32 mono at `sampling_rate`, already
    cropped), `text` (str), `label` (int) and optionally `valid` (bool). The feature extractor
    (`Wav2Vec2FeatureExtractor`) normalises each utterance over its own samples, then zero pads
    (`audio_values`: its arithmetic in numpy). Never over the padded array: that would normalise the
    padding too (so padding would no longer be zero), which is what a group-norm checkpoint's
    preprocessor config (`return_attention_mask: false`) would otherwise make the extractor do.
    """

    def __init__(self, feature_extractor, tokenizer, max_text_tokens: int, sampling_rate: int = SAMPLING_RATE, *,
                 length_ladder: int = 0, max_audio_samples: int | None = None):
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.max_text_tokens = max_text_tokens
        self.sampling_rate = sampling_rate
        self.length_ladder = length_ladder
        """Rungs per octave of the padded lengths (0: pad to the batch's longest)."""
        self.max_audio_samples = max_audio_samples
        """The training crop: the audio ladder's top rung (None: evaluation, no crop)."""

    def audio_values(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """[B, T] float32: each utterance normalised over its own samples, then zero padded.

        For Wav2Vec2's feature extractor (Wav2Vec2, HuBERT, WavLM) this is its own arithmetic in a few
        lines of numpy, bit for bit (tested): calling it costs about half of the data loader's time
        (per-utterance Python, padding first, a mask). Any other feature extractor is called as is.
        """
        fe = self.feature_extractor
        if not isinstance(fe, Wav2Vec2FeatureExtractor) or fe.feature_size != 1:
            audio = fe(arrays, sampling_rate=self.sampling_rate, padding="max_length",
                       max_length=self.padded_samples(arrays), return_attention_mask=True, return_tensors="pt")
            return audio["input_values"].to(torch.float32)
        padded = np.full((len(arrays), self.padded_samples(arrays)), fe.padding_value, dtype=np.float32)
        for row, samples in zip(padded, arrays):
            if fe.do_normalize:
                samples = (samples - samples.mean()) / np.sqrt(samples.var() + 1e-7)
            row[: len(samples)] = samples
        return torch.from_numpy(padded)

    def padded_samples(self, arrays: list[np.ndarray]) -> int:
        """T of the batch: its longest utterance, or the ladder's rung above it."""
        return ladder_length(max(len(a) for a in arrays), AUDIO_QUANTUM, self.length_ladder, self.max_audio_samples)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
        if not examples:
            return None
        arrays = [np.asarray(ex["array"], dtype=np.float32) for ex in examples]
        lengths = torch.tensor([len(a) for a in arrays], dtype=torch.long)
        padded_samples = len(arrays) * self.padded_samples(arrays)
        batch: dict[str, Any] = {
            "labels": torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long),
            "ids": [str(ex["id"]) for ex in examples],
            "audio_seconds": float(lengths.sum()) / self.sampling_rate,
            "padded_audio_seconds": padded_samples / self.sampling_rate,
        }
        # A unimodal model has no processor for the other modality (None): its inputs are left out.
        if self.feature_extractor is not None:
            batch["input_values"] = self.audio_values(arrays)  # [B, T_samples]
            batch["audio_lengths"] = lengths  # [B]
        if self.tokenizer is not None:
            text = self.tokenizer(
                [ex.get("text") or "" for ex in examples],
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            input_ids, attention_mask = text["input_ids"].to(torch.long), text["attention_mask"].to(torch.long)
            extra = ladder_length(input_ids.shape[1], TEXT_QUANTUM, self.length_ladder,
                                  self.max_text_tokens) - input_ids.shape[1]
            if extra > 0:  # up to the ladder's rung: padding tokens, masked out
                input_ids = torch.nn.functional.pad(input_ids, (0, extra), value=self.tokenizer.pad_token_id or 0)
                attention_mask = torch.nn.functional.pad(attention_mask, (0, extra), value=0)
            batch["input_ids"] = input_ids  # [B, L]
            batch["attention_mask"] = attention_mask  # [B, L]
        flags = [bool(ex.get("valid", True)) for ex in examples]
        batch["num_valid"] = sum(flags)  # a Python int: counted without reading a tensor
        if any("valid" in ex for ex in examples):
            batch["valid"] = torch.tensor(flags, dtype=torch.bool)
        return batch
