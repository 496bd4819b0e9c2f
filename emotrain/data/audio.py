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


MAX_ABS_SAMPLE = 1e12
"""The largest sample magnitude that becomes model input. Wav2Vec2's feature extractor normalises
each utterance in float32 (`(x - mean) / sqrt(var + 1e-7)`, as `Collator.audio_values` does): the
squared deviations overflow beyond ~1e19 (a float wav at 1e30 gives inf/nan features, with only a
numpy warning). Real audio lies within ±1 (±32768 when integer-scaled into a float file); at 1e12
any utterance shorter than ~10^13 samples normalises to finite features, and so does every crop or
window of it (a part of a bounded signal is bounded)."""


def check_waveform(mono: np.ndarray) -> np.ndarray:
    """`mono`, if it can become finite model input; else `AudioDecodeError` saying why (empty,
    non-finite samples, or samples too large for finite normalised features). Every path from
    audio to model input passes here: decoding (training, evaluation, predict), predict's arrays,
    and prepare."""
    if mono.size == 0:
        raise AudioDecodeError("empty audio")
    if not np.isfinite(mono).all():
        raise AudioDecodeError("non-finite samples")
    peak = float(np.abs(mono).max())
    if peak > MAX_ABS_SAMPLE:
        raise AudioDecodeError(f"samples up to {peak:.3g} (at most {MAX_ABS_SAMPLE:g}): normalising them would "
                               "give non-finite features; rescale the audio")
    return mono


def decode_audio(data: bytes | None, sampling_rate: int) -> np.ndarray:
    """Decode encoded audio bytes to float32 mono at `sampling_rate`.

    Multi-channel audio is averaged to mono; another rate is resampled with soxr (HQ).
    Raises `AudioDecodeError` for unreadable audio, or audio `check_waveform` refuses.
    """
    if not data:
        raise AudioDecodeError("no audio bytes")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"soundfile cannot decode the bytes: {err}") from err
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line, not a warning
        mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
        if rate != sampling_rate:
            mono = soxr.resample(mono, rate, sampling_rate, quality="HQ")
    return check_waveform(np.ascontiguousarray(mono, dtype=np.float32))


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
