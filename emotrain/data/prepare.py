"""`emotrain prepare`: an IEMOCAP release tree → Parquet shards, one folder per session.

Audio is read with soundfile, down-mixed to mono, resampled to 16 kHz with soxr when needed and
stored as encoded bytes (FLAC by default: lossless, about half the size of WAV). Reading and
encoding run in a process pool over all cores; the full corpus (7 h of kept audio) takes minutes.
`out_dir` may be a local folder or an fsspec URL (`s3://bucket/prefix`): shards and report are
written there directly (`emotrain.data.shards`).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from emotrain.config import LABEL_NAMES, check_no_credentials
from emotrain.data.iemocap import Utterance, scan_release
from emotrain.data.shards import (
    REPORT_FILE,
    SAMPLING_RATE,
    filesystem,
    join,
    storage_error,
    write_session_shards,
    write_text,
)

AUDIO_FORMATS = ("flac", "wav")
MIN_SECONDS = 0.1
"""Shorter audio is skipped: it holds no speech, and a Wav2Vec2 encoder needs 25 ms for one frame
(training on it would fail mid-epoch). IEMOCAP's shortest kept utterance is 0.59 s."""


class NothingToPrepareError(RuntimeError):
    """The release tree held no usable utterance."""


@dataclass
class EncodedAudio:
    data: bytes | None
    duration: float
    error: str | None = None


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """[T] or [T, channels] at any rate → float32 [T'] mono at 16 kHz."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    samples = samples.astype(np.float32, copy=False)
    if rate != SAMPLING_RATE:
        samples = soxr.resample(samples, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)
    return samples


def encode_wav_file(path: str, audio_format: str = "flac") -> EncodedAudio:
    """Read one utterance's wav and return it as 16 kHz mono bytes; errors are returned, not raised."""
    if not os.path.isfile(path):
        return EncodedAudio(None, 0.0, "missing wav")
    try:
        samples, rate = sf.read(path, dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises several types for corrupt headers
        return EncodedAudio(None, 0.0, f"unreadable wav: {type(err).__name__}: {err}")
    if samples.size == 0:
        return EncodedAudio(None, 0.0, "empty wav (0 samples)")
    mono = to_mono_16k(samples, rate)
    if not np.isfinite(mono).all():
        return EncodedAudio(None, 0.0, "unreadable wav: non-finite samples")
    if len(mono) < MIN_SECONDS * SAMPLING_RATE:
        return EncodedAudio(None, 0.0, f"too short ({len(mono) / SAMPLING_RATE:.3f} s < {MIN_SECONDS} s)")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(mono, -1.0, 1.0), SAMPLING_RATE, format=audio_format.upper(), subtype="PCM_16")
    return EncodedAudio(buffer.getvalue(), len(mono) / SAMPLING_RATE)


def _encode_job(args: tuple[str, str]) -> EncodedAudio:
    return encode_wav_file(*args)


def _open_output(out_dir: str | Path) -> None:
    """Create `out_dir` (a folder, or a prefix on object storage) before any audio is encoded: missing
    credentials or an unreachable endpoint then fail in a second, not after the whole corpus."""
    fs, root = filesystem(out_dir)
    try:
        fs.makedirs(root, exist_ok=True)
    except Exception as err:
        error = storage_error(out_dir, err, key="out_dir")
        if error is None:
            raise
        raise error from err


def prepare(
    release_root: str | Path,
    out_dir: str | Path,
    *,
    num_shards: int = 8,
    audio_format: str = "flac",
    workers: int | None = None,
) -> dict:
    """Write the prepared dataset and `prepare_report.json`; return the report."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
    check_no_credentials(out_dir, "out_dir")
    _open_output(out_dir)
    started = time.perf_counter()
    utterances, dropped_codes = scan_release(release_root)

    skipped: list[dict] = []
    candidates: list[Utterance] = []
    for utt in utterances:
        if utt.text is None:
            skipped.append({"id": utt.id, "reason": "no transcription line"})
        else:
            candidates.append(utt)

    workers = workers or os.cpu_count() or 1
    jobs = [(str(utt.wav_path), audio_format) for utt in candidates]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            encoded = list(pool.map(_encode_job, jobs, chunksize=16))
    else:
        encoded = [_encode_job(job) for job in jobs]

    by_session: dict[int, list[dict]] = {}
    for utt, audio in zip(candidates, encoded):
        if audio.error is not None:
            skipped.append({"id": utt.id, "reason": audio.error})
            continue
        by_session.setdefault(utt.session, []).append(
            {
                "id": utt.id,
                "session": utt.session,
                "speaker": utt.speaker,
                "dialog": utt.dialog,
                "emotion": utt.emotion,
                "label": utt.label,
                "text": utt.text,
                "audio": {"bytes": audio.data, "path": f"{utt.id}.{audio_format}"},
                "duration": audio.duration,
                "valence": utt.valence,
                "activation": utt.activation,
                "dominance": utt.dominance,
            }
        )
    kept = sum(len(rows) for rows in by_session.values())
    if kept == 0:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        raise NothingToPrepareError(
            f"no usable utterance under {release_root}: {len(utterances)} labelled 4-class utterances "
            f"found, all skipped ({dict(reasons)})"
        )

    counts = {}
    for session in sorted(by_session):
        rows = by_session[session]
        write_session_shards(rows, out_dir, session, num_shards)
        per_class = Counter(LABEL_NAMES[row["label"]] for row in rows)
        counts[f"session{session}"] = {name: per_class.get(name, 0) for name in LABEL_NAMES} | {
            "total": len(rows),
            "seconds": round(sum(row["duration"] for row in rows), 2),
        }
    report = {
        "source": str(release_root),
        "num_shards_per_session": num_shards,
        "audio_format": audio_format,
        "sampling_rate": SAMPLING_RATE,
        "kept": kept,
        "counts": counts,
        "emotion_codes_kept": dict(sorted(Counter(u.emotion for u in candidates).items())),
        "dropped_outside_4_classes": dropped_codes,
        "skipped": sorted(skipped, key=lambda s: s["id"]),
        "elapsed_seconds": round(time.perf_counter() - started, 2),
    }
    write_text(join(out_dir, REPORT_FILE), json.dumps(report, indent=2))
    return report


def summarize(report: dict) -> str:
    """A few lines for the console."""
    lines = [f"kept {report['kept']} utterances in {report['elapsed_seconds']} s"]
    header = f"{'':10}" + "".join(f"{name:>9}" for name in LABEL_NAMES) + f"{'total':>9}{'hours':>8}"
    lines.append(header)
    for session, row in report["counts"].items():
        cells = "".join(f"{row[name]:>9}" for name in LABEL_NAMES)
        lines.append(f"{session:10}{cells}{row['total']:>9}{row['seconds'] / 3600:>8.2f}")
    if report["skipped"]:
        reasons = Counter(s["reason"].split(":")[0] for s in report["skipped"])
        lines.append(f"skipped {len(report['skipped'])}: " + ", ".join(f"{r} ({n})" for r, n in reasons.items()))
    dropped = sum(report["dropped_outside_4_classes"].values())
    lines.append(f"outside the 4-class set (dropped): {dropped}")
    return "\n".join(lines)
