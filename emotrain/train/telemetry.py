"""What a training step costs: model FLOPs per utterance, the device's measured matmul peak, memory.

    flops = flops_per_utterance(model, feature_extractor, tokenizer, seconds=4.5, tokens=24)
    peak = matmul_peak_flops(device, torch.bfloat16)
    mfu = 3 * flops * utterances_per_second / peak      # forward + backward ≈ 3 x forward

FLOPs are counted once, at start, with `torch.utils.flop_counter.FlopCounterMode` on a forward pass
of one utterance of the training split's mean (cropped) duration and a typical transcript (the
Trainer's built-in counter counts raw audio samples as tokens, ~320x too high). Backward is taken as
twice the forward, the usual approximation: it overstates the work a little when parts are frozen
(the conv feature encoder of a pretrained audio encoder), and attention grows with the square of the
length, so a batch of long utterances does a little more per utterance than the mean one.
"""

from __future__ import annotations

import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from emotrain.config import SAMPLING_RATE


@torch.no_grad()
def flops_per_utterance(model, feature_extractor, tokenizer, *, seconds: float, tokens: int,
                        sampling_rate: int = SAMPLING_RATE) -> float:
    """Forward FLOPs of `model` (an EmotionModel, unwrapped) for one utterance of `seconds` of audio
    and `tokens` tokens. Runs on the model's device, in eval mode, with the RNG left untouched."""
    device = next(model.parameters()).device
    samples = max(int(seconds * sampling_rate), sampling_rate // 10)
    inputs = {}
    if model.uses_audio:
        inputs["input_values"] = torch.zeros(1, samples, device=device)
        inputs["audio_lengths"] = torch.tensor([samples], device=device)
    if model.uses_text:
        ids = tokenizer(" ".join(["word"] * max(tokens - 2, 1)), return_tensors="pt", truncation=True,
                        max_length=max(tokens, 2))
        inputs["input_ids"] = ids["input_ids"].to(device)
        inputs["attention_mask"] = ids["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                FlopCounterMode(display=False) as counter:
            model(**inputs)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, measured for about `seconds` (the peak the
    model's utilisation is a share of). On a GPU it synchronises: call it once, before training."""
    size = size or (8192 if device.type == "cuda" else 1024)
    # Its own generator: the default one's state belongs to the training (a resumed run must draw
    # the same dropout masks as the uninterrupted one).
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm up
        a @ b
    sync()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 3:
        a @ b
        runs += 1
        if runs % 8 == 0:
            sync()
    sync()
    return 2 * size**3 * runs / (time.perf_counter() - started)


def peak_memory_gib(device: torch.device) -> float | None:
    """The most memory the device held for tensors since the start (None without an accelerator).
    A host-side query of the allocator's counters: no device sync."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def peak_host_memory_gib() -> float:
    """The most resident memory this process has held since it started (the host side: the model on a
    CPU, the optimizer with ZeRO offload, batches being decoded with num_workers=0), from getrusage."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
