"""A trained model on data: `emotrain evaluate` (prepared data → metrics) and `emotrain predict`.

    emotrain evaluate runs/smoke/fold1/best runs/synthetic/prepared --session 1
    emotrain predict runs/smoke/fold1/best --audio clip.wav --text "I can't believe it"
    emotrain predict runs/smoke/fold1/best --manifest clips.csv --out predictions.jsonl [--asr MODEL]

    predictor = emotrain.predict.load("runs/smoke/fold1/best")
    predictor.predict("clip.wav", text="I can't believe it")   # {"predicted": "angry", "probabilities": {...}, ...}

A model folder (`best/` of a run) carries its processors and how its inputs were prepared
(`sampling_rate`, `max_text_tokens`, the training crop `max_audio_seconds`). Audio files of any
sampling rate and channel count are decoded with soundfile, down-mixed and resampled with soxr.

Long recordings: validation and test score each utterance at full length (IEMOCAP's reach 34 s), so
a recording up to `max_full_seconds` (60 s) is scored whole, exactly as `evaluate` scores it. A
longer one is cut into windows of the training crop (`max_audio_seconds`) with half a window of
overlap, each window is scored with the whole transcript, and the probabilities are averaged; the
output's `audio.handling` says which was done.

A model that needs text takes the transcript given, or one from a speech recogniser (`asr`: a hub
name or a local CTC or sequence-to-sequence model folder, run through transformers' ASR pipeline);
the transcript used, and where it came from, is part of every prediction.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import soundfile as sf
import soxr
import torch
from safetensors import SafetensorError

from emotrain.config import ConfigError, check_no_credentials
from emotrain.data.asr import Transcriber
from emotrain.data.audio import AudioDecodeError, check_waveform, decode_audio
from emotrain.data.batching import Collator
from emotrain.data.sources.manifest import ManifestError, read_text_file
from emotrain.model.emotion_model import (
    CONFIG_FILE,
    FEATURE_EXTRACTOR_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    EmotionModel,
)
from emotrain.model.masks import audio_frame_lengths

MAX_FULL_SECONDS = 60.0
"""Longer recordings are scored in windows (see the module docstring)."""


class InputError(ValueError):
    """One input (a row of a batch) that cannot be predicted: the message says why."""


def refuse_credentials(path: str | Path, argument: str) -> None:
    """InputError naming `argument` (never the secret) for a path that is a URL carrying credentials:
    messages, results and logs quote the paths they were given (`check_no_credentials`)."""
    try:
        check_no_credentials(path, argument)
    except ConfigError as err:
        raise InputError(str(err)) from None


@dataclass
class PreparedInput:
    """One recording, decoded and ready: the windows to score and the transcript."""

    windows: list[np.ndarray]
    transcript: str | None
    transcript_source: str | None
    audio: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Prediction.


def read_audio(audio: str | Path | np.ndarray, sampling_rate: int | None, target_rate: int) -> tuple[np.ndarray, dict]:
    """(mono float32 samples at `target_rate`, what the input was). Raises InputError."""
    if isinstance(audio, (str, Path)):
        refuse_credentials(audio, "the audio path")
        path = Path(audio)
        if not path.is_file():
            raise InputError(f"{path} is not a file" if path.exists() else f"no such audio file: {path}")
        try:
            info = sf.info(str(path))
            samples = decode_audio(path.read_bytes(), target_rate)
        except (AudioDecodeError, RuntimeError, OSError) as err:
            raise InputError(f"cannot read audio {path}: {' '.join(str(err).split())}") from None
        return samples, {"path": str(path), "sampling_rate": int(info.samplerate), "channels": int(info.channels),
                         "seconds": round(len(samples) / target_rate, 3)}
    if sampling_rate is None:
        raise InputError("an audio array needs its sampling_rate")
    array = np.asarray(audio, dtype=np.float32)
    channels = 1 if array.ndim == 1 else array.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, in one line, not a warning
        mono = array if array.ndim == 1 else array.mean(axis=1)  # [T, channels] → [T]
        if sampling_rate != target_rate:
            mono = soxr.resample(mono, sampling_rate, target_rate, quality="HQ")
    try:
        mono = check_waveform(np.ascontiguousarray(mono, dtype=np.float32))
    except AudioDecodeError as err:
        raise InputError(f"unusable audio array: {err}") from None
    return mono, {
        "sampling_rate": int(sampling_rate), "channels": int(channels), "seconds": round(len(mono) / target_rate, 3)}


def windows_of(samples: np.ndarray, window: int, hop: int) -> list[np.ndarray]:
    """Windows of `window` samples every `hop` samples, the last one ending at the end."""
    if len(samples) <= window:
        return [samples]
    starts = list(range(0, len(samples) - window + 1, hop))
    if starts[-1] + window < len(samples):
        starts.append(len(samples) - window)
    return [samples[s : s + window] for s in starts]


class Predictor:
    """Class probabilities of a model for recordings (and transcripts), one or a batch at a time."""

    def __init__(self, model: EmotionModel, *, asr: Transcriber | None = None,
                 max_full_seconds: float = MAX_FULL_SECONDS, window_seconds: float | None = None,
                 batch_size: int = 8):
        self.model = model.eval()
        self.asr = asr
        settings = model.preprocessing
        self.sampling_rate = int(settings["sampling_rate"])
        self.max_full_seconds = max_full_seconds
        self.window_seconds = float(window_seconds if window_seconds is not None else settings["max_audio_seconds"])
        self.batch_size = batch_size
        self.label_names = list(model.label_names)
        feature_extractor, tokenizer = model.processors()
        self.collator = Collator(feature_extractor, tokenizer, int(settings["max_text_tokens"]), self.sampling_rate)
        self.device = next(model.parameters()).device
        self.min_samples = 1
        if model.uses_audio:  # the encoder's receptive field: shorter audio gives no frame at all
            lengths = torch.arange(1, 2 * self.sampling_rate, dtype=torch.long)
            enough = torch.nonzero(audio_frame_lengths(model.audio_encoder, lengths) >= 1)
            self.min_samples = int(lengths[enough[0]]) if len(enough) else 1
        self._check_settings()

    def _check_settings(self) -> None:
        """Refuse settings that would fail on every input, or give all-zero probabilities (a batch
        size below 1 scores no window at all): InputError naming the option."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: give a whole number of windows, 1 or more")
        if not (self.max_full_seconds > 0 and math.isfinite(self.max_full_seconds)):
            raise InputError(f"--max-full-seconds {self.max_full_seconds}: give a positive number of seconds")
        shortest = self.min_samples / self.sampling_rate
        if not (self.window_seconds >= shortest and math.isfinite(self.window_seconds)):
            raise InputError(f"--window-seconds {self.window_seconds:g}: give a number of seconds from "
                             f"{shortest:g} (one frame of the audio encoder) up")

    def prepare(self, audio, text: str | None = None, sampling_rate: int | None = None) -> PreparedInput:
        """Decode, resample, window and find the transcript of one input. Raises InputError."""
        samples, info = read_audio(audio, sampling_rate, self.sampling_rate)
        if len(samples) < self.min_samples:
            ms = 1000 / self.sampling_rate
            raise InputError(f"{info.get('path', 'the audio')} is {len(samples) * ms:.1f} ms long, shorter than one "
                             f"frame of the audio encoder ({self.min_samples * ms:.1f} ms)")
        seconds = len(samples) / self.sampling_rate
        if seconds <= self.max_full_seconds:
            windows, info["handling"] = [samples], "full length (as validation and test score it)"
        else:
            window = int(self.window_seconds * self.sampling_rate)
            windows = windows_of(samples, window, max(1, window // 2))
            info["handling"] = (f"{len(windows)} windows of {self.window_seconds:g} s (the training crop), hop "
                                f"{self.window_seconds / 2:g} s, probabilities averaged (longer than {self.max_full_seconds:g} s)")
        transcript = source = None
        if self.model.uses_text:
            transcript = " ".join((text or "").split())
            source = "given"
            if not transcript and self.asr is not None:
                transcript, source = self.asr(samples, self.sampling_rate), f"asr:{self.asr.name}"
                if not transcript:
                    raise InputError(f"the speech recogniser {self.asr.name} heard no words: this model needs a transcript")
            if not transcript:
                raise InputError(f"empty transcript: a {self.model.config.variant} model needs one "
                                 "(give the text, or a speech recogniser with --asr)")
        return PreparedInput(windows, transcript, source, info)

    @torch.no_grad()
    def _probabilities(self, inputs: list[PreparedInput]) -> list[np.ndarray]:
        """[num_labels] probabilities of each input (the mean over its windows)."""
        items = [(k, w) for k, prepared in enumerate(inputs) for w in prepared.windows]
        sums = [np.zeros(len(self.label_names)) for _ in inputs]
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            batch = self.collator([{"id": str(k), "array": w, "text": inputs[k].transcript or "", "label": 0}
                                   for k, w in chunk])
            tensors = {key: batch[key].to(self.device) for key in ("input_values", "audio_lengths", "input_ids",
                                                                   "attention_mask") if key in batch}
            probabilities = self.model(**tensors).logits.float().softmax(dim=-1).cpu().numpy()
            for (k, _), p in zip(chunk, probabilities):
                sums[k] += p
        return [s / len(prepared.windows) for s, prepared in zip(sums, inputs)]

    def _result(self, prepared: PreparedInput, probabilities: np.ndarray) -> dict[str, Any]:
        return {
            "predicted": self.label_names[int(np.argmax(probabilities))],
            "probabilities": {name: float(p) for name, p in zip(self.label_names, probabilities)},
            "transcript": prepared.transcript,
            "transcript_source": prepared.transcript_source,
            "audio_info": prepared.audio,
        }

    def predict(self, audio, text: str | None = None, *, sampling_rate: int | None = None) -> dict[str, Any]:
        """Class probabilities for one recording: `audio` is a file path (any rate and channel count:
        resampled and down-mixed) or a float array at `sampling_rate`; `text` its transcript (needed
        by the fusion and text variants). Returns `{"predicted", "probabilities": {class: p},
        "transcript", "transcript_source", "audio_info": {...how the audio was handled}}`, as
        `emotrain predict` prints it. Raises InputError for an input that cannot be predicted.

            load("runs/smoke/fold1/best").predict("clip.wav", text="I can't believe you did that")["predicted"]
        """
        prepared = self.prepare(audio, text, sampling_rate)
        return self._result(prepared, self._probabilities([prepared])[0])

    def predict_rows(self, rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Predictions for manifest rows (`read_manifest`), in order; a row that cannot be predicted
        yields its `error` instead, and the others go on."""
        pending: list[tuple[dict, PreparedInput]] = []

        def flush() -> Iterator[dict[str, Any]]:
            try:
                results = self._probabilities([prep for _, prep in pending])
            except (RuntimeError, ValueError):  # e.g. out of memory: each row alone, each its own outcome
                results = None
            for k, (row, prepared) in enumerate(pending):
                try:
                    p = results[k] if results is not None else self._probabilities([prepared])[0]
                except (RuntimeError, ValueError) as err:
                    yield {**_row_fields(row), "error": f"the model failed on this input: {' '.join(str(err).split())}"}
                    continue
                yield {**_row_fields(row), **self._result(prepared, p)}
            pending.clear()

        for row in rows:
            if row.get("error"):
                yield from flush()
                yield {**_row_fields(row), "error": row["error"]}
                continue
            try:
                pending.append((row, self.prepare(row["audio"], row.get("text"))))
            except InputError as err:
                yield from flush()
                yield {**_row_fields(row), "error": str(err)}
                continue
            except Exception as err:  # noqa: BLE001 - a recogniser or tokenizer failure is this row's, not the batch's
                yield from flush()
                yield {**_row_fields(row), "error": f"cannot prepare this input: {type(err).__name__}: "
                                                    f"{' '.join(str(err).split())}"}
                continue
            if sum(len(prep.windows) for _, prep in pending) >= self.batch_size:
                yield from flush()
        yield from flush()


def _row_fields(row: dict) -> dict:
    return {key: row[key] for key in ("row", "id", "audio") if row.get(key) is not None}


def read_manifest(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV (header with `audio`, optional `text`, `id`) or JSONL manifest: `{"row", "audio",
    "text", "id"}` with audio paths resolved against the manifest's folder, or `{"row", "error"}` for
    a malformed row (the rest still come)."""
    refuse_credentials(path, "--manifest")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such manifest: {path}")
    try:
        text = read_text_file(path)
    except ManifestError as err:
        raise InputError(str(err)) from None

    def row_of(number: int, record: Any) -> dict[str, Any]:
        if not isinstance(record, dict):
            return {"row": number, "error": f"malformed row: expected an object with `audio`, got {record!r}"}
        audio = record.get("audio")
        if not isinstance(audio, str) or not audio.strip():
            return {"row": number, "id": record.get("id"), "error": "malformed row: no `audio` path"}
        try:  # before the path is resolved against the manifest's folder, which makes `s3://` `s3:/`
            refuse_credentials(audio.strip(), "its `audio` path")
        except InputError as err:
            return {"row": number, "id": record.get("id"), "error": f"malformed row: {err}"}
        resolved = Path(audio.strip())
        if not resolved.is_absolute():
            resolved = path.parent / resolved
        transcript = record.get("text")
        return {"row": number, "id": record.get("id"), "audio": str(resolved),
                "text": None if transcript is None else str(transcript)}

    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if "audio" not in (reader.fieldnames or []):
            raise InputError(f"{path}: a CSV manifest needs an `audio` column (found {reader.fieldnames})")
        for number, record in enumerate(reader, 1):
            if None in record or None in record.values():  # more or fewer fields than the header
                yield {"row": number, "id": record.get("id"), "error": f"malformed row: {len(reader.fieldnames)} columns expected"}
            else:
                yield row_of(number, record)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            yield {"row": number, "error": f"malformed row: not JSON ({err})"}
            continue
        yield row_of(number, record)


def check_model_folder(model_dir: str | Path) -> None:
    """Raise InputError unless `model_dir` is a model folder `EmotionModel.from_pretrained` loads."""
    refuse_credentials(model_dir, "MODEL_DIR")
    if not (Path(model_dir) / CONFIG_FILE).is_file():
        raise InputError(f"{model_dir} is not a model folder (no {CONFIG_FILE}): give a run's best/ folder, "
                         "e.g. runs/smoke/fold1/best")


MODEL_FOLDER_DAMAGE = (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError)
"""What loading a damaged or incomplete model folder raises: a missing or truncated file, JSON or a
config that does not parse, weights that are not this model's."""


def load_model_folder(model_dir: str | Path) -> EmotionModel:
    """The model in a model folder (a run's `best/`) with the processors its variant needs, or
    InputError naming the folder and what is wrong with it (predict and evaluate load through here)."""
    check_model_folder(model_dir)
    try:
        model = EmotionModel.from_pretrained(model_dir)  # on the CPU: a device's errors are not the folder's
    except MODEL_FOLDER_DAMAGE as err:
        damaged = f"{WEIGHTS_FILE}: " if isinstance(err, SafetensorError) else ""
        raise InputError(f"cannot load the model folder {model_dir} ({damaged}{type(err).__name__}: "
                         f"{' '.join(str(err).split())}): it is damaged or incomplete; give a run's best/ folder "
                         "as training wrote it") from None
    feature_extractor, tokenizer = model.processors()
    needs = ((FEATURE_EXTRACTOR_FILE, model.uses_audio, feature_extractor), (TOKENIZER_FILE, model.uses_text, tokenizer))
    missing = [name for name, needed, found in needs if needed and found is None]
    if missing:
        raise InputError(f"the model folder {model_dir} has no {' or '.join(missing)}, which a "
                         f"{model.config.variant} model needs: give a run's best/ folder as training wrote it")
    return model


def _device(name: str | torch.device | None) -> torch.device:
    """The device to predict on (default: the GPU when there is one), or InputError for one there is not."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"--device {name}: {' '.join(str(err).split())}") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise InputError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) here: "
                         "give another, or --device cpu")
    return device


def load(model_dir: str | Path, *, device: str | torch.device | None = None, asr: str | None = None,
         max_full_seconds: float = MAX_FULL_SECONDS, window_seconds: float | None = None,
         batch_size: int = 8) -> Predictor:
    """A model folder (a run's `best/`) ready to predict, as `emotrain predict` loads it:

        load("runs/smoke/fold1/best").predict("clip.wav", text="I can't believe you did that")

    device: default the GPU when there is one, else the CPU. asr: a speech recogniser (hub name or
    local folder) for inputs without a transcript, loaded only when the model takes text.
    Raises InputError for a folder that is no model folder, `emotrain.data.asr.RecogniserError` (a
    ValueError) for a recogniser that cannot be loaded."""
    device = _device(device)
    model = load_model_folder(model_dir).to(device)
    transcriber = Transcriber(asr, device=device) if asr and model.uses_text else None
    return Predictor(model, asr=transcriber, max_full_seconds=max_full_seconds, window_seconds=window_seconds,
                     batch_size=batch_size)


def check_output_file(path: str | Path) -> None:
    """InputError unless `path` can be written as a file (a folder there, or no folder to hold it,
    would fail only after all the work)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--out {path} is a folder: give a file name")
    if not path.parent.is_dir():
        raise InputError(f"--out {path}: no folder {path.parent} to write it in")


def predict_manifest(predictor: Predictor, manifest: str | Path, out) -> int:
    """Predict every row of a manifest into JSONL (`out`: a path or an open text stream), one line
    per row in order; each failed row is also said on stderr. Returns 1 if any row failed, else 0."""
    try:
        stream = open(out, "w") if isinstance(out, (str, Path)) else out
    except OSError as err:
        raise InputError(f"cannot write the predictions to {out}: {err.strerror or err}") from None
    total = failed = 0
    try:
        for result in predictor.predict_rows(read_manifest(manifest)):
            total += 1
            if "error" in result:
                failed += 1
                print(f"emotrain predict: row {result.get('row')}: {result['error']}", file=sys.stderr)
            stream.write(json.dumps(result) + "\n")
            stream.flush()
    finally:
        if stream is not out:
            stream.close()
    where = f" → {out}" if isinstance(out, (str, Path)) else ""
    print(f"emotrain predict: {total - failed} of {total} row(s) predicted, {failed} failed{where}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Evaluation on prepared data.


def _evaluation_precision(requested: str | None, run_config: dict, saved: Path) -> str:
    """The precision to evaluate in: `requested` (--mixed-precision), else the run's training
    precision, under training's one rule (`training_precision`: fp16 needs a CUDA GPU, fp32 without
    one, said once on stderr); the results record what ran."""
    from emotrain.train.deepspeed_config import training_precision

    source = "--mixed-precision" if requested is not None else f"the run's train.mixed_precision ({saved})"
    if requested is None:
        run_train = run_config.get("train")
        requested = run_train.get("mixed_precision", "no") if isinstance(run_train, dict) else "no"
    precision = training_precision(requested, cuda=torch.cuda.is_available())
    if precision != requested:
        print(f"emotrain evaluate: {source} asks for {requested}, which needs a CUDA GPU, and this machine has none: "
              "evaluating in fp32 (mixed precision no)", file=sys.stderr)
    return precision


def evaluate_model(model_dir: str | Path, data_dir: str, *, sessions: list[int] | None = None,
                   batch_size: int | None = None, mixed_precision: str | None = None,
                   per_utterance: bool = False) -> dict:
    """The metrics of a saved model on prepared data, as `metrics.json` has them under `test`."""
    import yaml
    from accelerate import Accelerator

    from emotrain.config import DataConfig
    from emotrain.data.evaluation import EvalDataset, build_eval_dataloader
    from emotrain.data.folds import read_metadata
    from emotrain.data.shards import read_dataset_info
    from emotrain.train.evaluation import evaluate
    from emotrain.train.run_folder import CONFIG_FILE as RUN_CONFIG_FILE

    refuse_credentials(data_dir, "DATA_DIR")
    check_model_folder(model_dir)
    model_dir = Path(model_dir)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: give a whole number of utterances, 1 or more")
    # As the run evaluated: its training precision and its evaluation batches (best/config.yaml).
    saved = model_dir / RUN_CONFIG_FILE
    try:
        run_config = (yaml.safe_load(saved.read_text(encoding="utf-8")) if saved.is_file() else None) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise InputError(f"cannot read {saved} ({' '.join(str(err).split())}): it is damaged; restore it, or "
                         "remove it and give --batch-size and --mixed-precision") from None
    if not isinstance(run_config, dict) or not isinstance(run_config.get("data", {}), dict):
        raise InputError(f"{saved} is not a run's configuration (a mapping with `data` and `train`): restore it, "
                         "or remove it and give --batch-size and --mixed-precision")
    run_data = run_config.get("data", {})
    mixed_precision = _evaluation_precision(mixed_precision, run_config, saved)
    model = load_model_folder(model_dir)
    info = read_dataset_info(data_dir)
    if tuple(info.labels) != tuple(model.label_names):
        raise InputError(f"the model predicts {list(model.label_names)} but the prepared data at {data_dir} is "
                         f"labelled {list(info.labels)}: evaluate it on data with its own label set")
    unknown = [s for s in sessions or () if s not in info.groups.values()]
    if unknown:
        raise InputError(f"no group {unknown} in the prepared data at {data_dir} (its groups: {info.groups})")
    sessions = sessions or sorted(info.groups.values())
    meta = read_metadata(data_dir, tuple(sessions), info=info)
    settings = model.preprocessing
    dataset = EvalDataset(meta, meta.id.tolist(), sampling_rate=int(settings["sampling_rate"]), name="evaluate")
    data_config = DataConfig(sampling_rate=int(settings["sampling_rate"]), max_text_tokens=int(settings["max_text_tokens"]),
                             eval_batch_size=batch_size or run_data.get("eval_batch_size", 8),
                             eval_max_batch_audio_seconds=run_data.get("eval_max_batch_audio_seconds", 160.0),
                             length_ladder=run_data.get("length_ladder", 0))  # the run's batches: its padding
    feature_extractor, tokenizer = model.processors()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    loader = build_eval_dataloader(dataset, data_config, feature_extractor=feature_extractor, tokenizer=tokenizer,
                                   rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=0)
    model = accelerator.prepare(model)
    metrics = evaluate(accelerator, model, loader, label_names=accelerator.unwrap_model(model).label_names,
                       per_utterance=per_utterance)
    return {"test": metrics, "model": str(model_dir), "data": str(data_dir), "sessions": sessions,
            "mixed_precision": mixed_precision}
