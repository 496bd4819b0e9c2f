"""`emotrain prepare`: utterance records from any source → Parquet shards, one folder per group.

Every source (`emotrain.data.sources`: the IEMOCAP release, a Hub dataset, a manifest, EmoBox's
fold lists) ends here, as a `Scan` of records (`emotrain.data.records`), in `write_prepared`: the
same layout, schema, `dataset.json` and `prepare_report.json` whatever the source. Audio is read
with soundfile (from a file or from the bytes a Hub dataset carries), down-mixed to mono, resampled
to 16 kHz with soxr when needed and stored as encoded bytes (FLAC by default: lossless, about half
the size of WAV). Reading and encoding run in a process pool over all cores; the full corpus (7 h
of kept audio) takes minutes.
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
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from emotrain.config import LABEL_NAMES, NUM_SHARDS_PER_GROUP, SAMPLING_RATE, check_no_credentials
from emotrain.data.asr import Transcriber
from emotrain.data.audio import AudioDecodeError, check_waveform
from emotrain.data.records import AudioInput, Scan
from emotrain.data.shards import (
    REPORT_FILE,
    DatasetInfo,
    FoldSpec,
    filesystem,
    is_local,
    join,
    storage_error,
    write_dataset_info,
    write_session_shards,
    write_text,
)
from emotrain.data.sources.release import scan_release_records

AUDIO_FORMATS = ("flac", "wav")
MIN_SECONDS = 0.1
"""Shorter audio is skipped: it holds no speech, and a Wav2Vec2 encoder needs 25 ms for one frame
(training on it would fail mid-epoch). IEMOCAP's shortest kept utterance is 0.59 s."""


class NothingToPrepareError(RuntimeError):
    """The source held no usable utterance."""


@dataclass
class EncodedAudio:
    data: bytes | None
    duration: float
    error: str | None = None
    samples: np.ndarray | None = None
    """The 16 kHz mono samples, kept only when a speech recogniser will transcribe them."""


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """[T] or [T, channels] at any rate → float32 [T'] mono at 16 kHz."""
    if samples.ndim == 2:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused (check_waveform), not warned
            samples = samples.mean(axis=1)
    samples = samples.astype(np.float32, copy=False)
    if rate != SAMPLING_RATE:
        samples = soxr.resample(samples, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)
    return samples


def encode_audio(audio: AudioInput, audio_format: str = "flac", keep_samples: bool = False) -> EncodedAudio:
    """Read one utterance's audio and return it as 16 kHz mono bytes; errors are returned, not raised."""
    if audio.data is None and (audio.path is None or not os.path.isfile(audio.path)):
        return EncodedAudio(None, 0.0, "missing wav" if audio.path else "no audio")
    try:
        source = io.BytesIO(audio.data) if audio.data is not None else audio.path
        samples, rate = sf.read(source, dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises several types for corrupt headers
        return EncodedAudio(None, 0.0, f"unreadable wav: {type(err).__name__}: {err}")
    if audio.start is not None or audio.end is not None:
        first = int(round((audio.start or 0.0) * rate))
        last = len(samples) if audio.end is None else int(round(audio.end * rate))
        samples = samples[first:last]
    if samples.size == 0:
        return EncodedAudio(None, 0.0, "empty wav (0 samples)")
    mono = to_mono_16k(samples, rate)
    try:
        check_waveform(mono)
    except AudioDecodeError as err:
        return EncodedAudio(None, 0.0, f"unusable wav: {err}")
    if len(mono) < MIN_SECONDS * SAMPLING_RATE:
        return EncodedAudio(None, 0.0, f"too short ({len(mono) / SAMPLING_RATE:.3f} s < {MIN_SECONDS} s)")
    buffer = io.BytesIO()
    clipped = np.clip(mono, -1.0, 1.0)
    sf.write(buffer, clipped, SAMPLING_RATE, format=audio_format.upper(), subtype="PCM_16")
    return EncodedAudio(buffer.getvalue(), len(mono) / SAMPLING_RATE, samples=clipped if keep_samples else None)


def _encode_job(args: tuple[AudioInput, str, bool]) -> EncodedAudio:
    return encode_audio(*args)


def _without_empty_groups(info: DatasetInfo, kept_groups: set[int]) -> DatasetInfo:
    """The description with only the groups that kept rows, and only the folds that still test on one."""
    groups = {name: number for name, number in info.groups.items() if number in kept_groups}
    folds = []
    for spec in info.folds:
        test = tuple(g for g in spec.test if g in kept_groups)
        if test:
            folds.append(FoldSpec(spec.number, tuple(g for g in spec.train if g in kept_groups), test,
                                  tuple(g for g in spec.validation if g in kept_groups)))
    return replace(info, groups=groups, folds=tuple(folds))


def _codes_per_label(by_group: dict[int, list[dict]], labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Label → the distinct emotion codes of the kept rows behind it, so a merge (exc → happy) is shown, not assumed."""
    codes: dict[str, set[str]] = {label: set() for label in labels}
    for rows in by_group.values():
        for row in rows:
            codes[labels[row["label"]]].add(str(row["emotion"]))
    return {label: tuple(sorted(found)) for label, found in codes.items()}


def write_prepared(scan: Scan, out_dir: str | Path, *, num_shards: int = NUM_SHARDS_PER_GROUP,
                   audio_format: str = "flac", workers: int | None = None, asr: str | None = None, started: float | None = None) -> dict:
    """Encode the scan's audio, write its shards, `dataset.json` and `prepare_report.json`; return
    the report. `asr`: a speech recogniser (hub name or local folder, as `emotrain predict --asr`)
    that transcribes every record the source gave no transcript."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
    open_output(out_dir)
    started = time.perf_counter() if started is None else started
    labels = scan.info.labels
    skipped = list(scan.skipped)
    candidates = list(scan.records)
    transcriber = None
    if asr is not None and any(not r.text for r in candidates):
        transcriber = Transcriber(asr)

    workers = workers or os.cpu_count() or 1
    jobs = [(r.audio, audio_format, transcriber is not None and not r.text) for r in candidates]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            encoded = list(pool.map(_encode_job, jobs, chunksize=16))
    else:
        encoded = [_encode_job(job) for job in jobs]

    by_group: dict[int, list[dict]] = {}
    transcribed = 0
    for record, audio in zip(candidates, encoded):
        if audio.error is not None:
            skipped.append({"id": record.id, "reason": audio.error})
            continue
        text = record.text or ""
        if audio.samples is not None:
            text, transcribed = transcriber(audio.samples, SAMPLING_RATE), transcribed + 1
        if not text and scan.info.has_text:
            skipped.append({"id": record.id, "reason": "no transcript"})
            continue
        by_group.setdefault(record.session, []).append(
            {
                "id": record.id,
                "session": record.session,
                "speaker": record.speaker,
                "dialog": record.dialog,
                "emotion": record.emotion,
                "label": record.label,
                "text": text,
                "audio": {"bytes": audio.data, "path": f"{record.id}.{audio_format}"},
                "duration": audio.duration,
                "valence": record.valence,
                "activation": record.activation,
                "dominance": record.dominance,
            }
        )
    kept = sum(len(rows) for rows in by_group.values())
    if kept == 0:
        reasons = Counter(s["reason"].split(":")[0] for s in skipped)
        raise NothingToPrepareError(
            f"no usable utterance in {scan.source}: {scan.read} rows read, {len(candidates)} labelled in "
            f"{list(labels)}, all skipped ({dict(reasons)})"
        )
    info = replace(_without_empty_groups(scan.info, set(by_group)), codes_per_label=_codes_per_label(by_group, labels))
    if transcribed:
        info = replace(info, notes=(*info.notes, f"transcripts of {transcribed} utterance(s) by the speech "
                                                 f"recogniser {asr}"))

    counts = {}
    for name, group in sorted(info.groups.items(), key=lambda item: item[1]):
        rows = by_group[group]
        write_session_shards(rows, out_dir, group, num_shards, folder_name=name, labels=labels)
        per_class = Counter(labels[row["label"]] for row in rows)
        counts[name] = {label: per_class.get(label, 0) for label in labels} | {
            "total": len(rows),
            "seconds": round(sum(row["duration"] for row in rows), 2),
        }
    write_dataset_info(out_dir, info)
    report = {
        "source": scan.source,
        "num_shards_per_session": num_shards,
        "audio_format": audio_format,
        "sampling_rate": SAMPLING_RATE,
        "labels": list(labels),
        "folds": info.fold_kind,
        "read": scan.read,
        "kept": kept,
        "counts": counts,
        "emotion_codes_kept": dict(sorted(Counter(
            str(r["emotion"]) for rows in by_group.values() for r in rows).items())),
        "dropped_outside_labels": dict(sorted(scan.dropped_labels.items())),
        "skipped": sorted(skipped, key=lambda s: s["id"]),
        "notes": list(info.notes),
        **scan.extra,
        "elapsed_seconds": round(time.perf_counter() - started, 2),
    }
    if tuple(labels) == LABEL_NAMES:  # the name earlier reports (and readers of IEMOCAP's) know
        report["dropped_outside_4_classes"] = report["dropped_outside_labels"]
    write_text(join(out_dir, REPORT_FILE), json.dumps(report, indent=2))
    report["lines"] = scan.lines
    return report


def open_output(out_dir: str | Path) -> list[str]:
    """Refuse an `out_dir` URL that carries credentials, and create `out_dir` (a folder, or a prefix on
    object storage) before the source is read: missing credentials or an unreachable endpoint then
    fail in a second, not after the whole corpus. Returns the local folders it created, deepest first."""
    check_no_credentials(out_dir, "OUT_DIR")
    fs, root = filesystem(out_dir)
    created: list[str] = []
    if is_local(fs):  # a prefix on object storage is no folder: nothing of it exists until a file does
        folder = Path(root)
        while not folder.exists() and folder != folder.parent:
            created.append(str(folder))
            folder = folder.parent
    try:
        fs.makedirs(root, exist_ok=True)
    except Exception as err:
        error = storage_error(out_dir, err, key="OUT_DIR")
        if error is None:
            raise
        raise error from err
    return created


@contextmanager
def output_folder(out_dir: str | Path) -> Iterator[None]:
    """`open_output`, undone when what follows fails before writing anything: a failed `emotrain
    prepare` leaves no empty folder behind. Only folders `open_output` created are removed, and only
    while they are empty (`os.rmdir` refuses anything else): a folder that existed, or holds a file, stays."""
    created = open_output(out_dir)
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:  # not empty (something was written) or already gone: keep the rest too
                break
        raise


def prepare(
    release_root: str | Path,
    out_dir: str | Path,
    *,
    num_shards: int = NUM_SHARDS_PER_GROUP,
    audio_format: str = "flac",
    workers: int | None = None,
) -> dict:
    """Prepare an IEMOCAP_full_release tree: write the dataset and `prepare_report.json`; return the report."""
    started = time.perf_counter()
    with output_folder(out_dir):
        return write_prepared(scan_release_records(release_root), out_dir, num_shards=num_shards,
                              audio_format=audio_format, workers=workers, started=started)


def summarize(report: dict) -> str:
    """A few lines for the console."""
    labels = report.get("labels", LABEL_NAMES)
    width = max(9, *(len(name) + 2 for name in labels))
    lines = [f"read {report.get('read', '?')} rows, kept {report['kept']} utterances in {report['elapsed_seconds']} s"]
    lines.append(f"{'':12}" + "".join(f"{name:>{width}}" for name in labels) + f"{'total':>9}{'hours':>8}")
    for group, row in report["counts"].items():
        cells = "".join(f"{row[name]:>{width}}" for name in labels)
        lines.append(f"{group:12}{cells}{row['total']:>9}{row['seconds'] / 3600:>8.2f}")
    if report["skipped"]:
        reasons = Counter(s["reason"].split(":")[0] for s in report["skipped"])
        lines.append(f"skipped {len(report['skipped'])}: " + ", ".join(f"{r} ({n})" for r, n in reasons.items()))
    dropped = report["dropped_outside_labels"]
    lines.append(f"outside the label set (dropped): {sum(dropped.values())}"
                 + (f" ({', '.join(f'{k} {v}' for k, v in dropped.items())})" if dropped else ""))
    lines.extend(report.get("lines", []))
    lines.extend(f"note: {note}" for note in report.get("notes", []))
    return "\n".join(lines)
