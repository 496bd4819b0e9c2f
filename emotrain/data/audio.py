"""Decoding and cropping helpers: soundfile for in-memory WAV/FLAC, soxr to resample, no FFmpeg.

Random crops are a pure function of (seed, epoch, utterance id): a resumed stream crops exactly as
the uninterrupted one did, whatever process or worker decodes the utterance.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import soundfile as sf
import soxr


class AudioDecodeError(ValueError):
    """Audio bytes that cannot be turned into a non-empty finite mono waveform."""


def decode_audio(data: bytes | None, sampling_rate: int) -> np.ndarray:
    """Decode encoded audio bytes to float32 mono at `sampling_rate`.

    Multi-channel audio is averaged to mono; another rate is resampled with soxr (HQ).
    Raises `AudioDecodeError` for unreadable, empty or non-finite audio.
    """
    if not data:
        raise AudioDecodeError("no audio bytes")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"soundfile cannot decode the bytes: {err}") from err
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise AudioDecodeError("empty audio")
    if not np.isfinite(mono).all():
        raise AudioDecodeError("non-finite samples")
    return mono


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from the parts' text (stable across processes, unlike `hash`)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def crop_offset(num_samples: int, max_samples: int, *, random: bool, seed: int, epoch: int, utt_id: str) -> int:
    """Start of the crop window: 0 if the audio fits or `random` is False, else seeded by (seed, epoch, id)."""
    if num_samples <= max_samples or not random:
        return 0
    rng = np.random.default_rng(stable_seed("crop", seed, epoch, utt_id))
    return int(rng.integers(0, num_samples - max_samples + 1))


def crop(samples: np.ndarray, max_samples: int, offset: int) -> np.ndarray:
    """At most `max_samples` samples starting at `offset`."""
    return samples[offset : offset + max_samples]


def cropped_seconds(duration: np.ndarray | float, max_audio_seconds: float | None):
    """Duration after training crops (what a batch really pads to); None means no crop."""
    if max_audio_seconds is None:
        return duration
    return np.minimum(duration, max_audio_seconds)
