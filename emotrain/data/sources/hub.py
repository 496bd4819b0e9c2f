"""Anything `datasets.load_dataset` takes (a Hub name, or a local copy of one), streamed, not downloaded whole.

The known IEMOCAP mirrors are recognised by their columns (labels are always normalised from
their string names, never from integer ids; session and speaker come from the utterance id by the
release's rule: the letter before the turn's digits names the speaker):

- `Ar4ikov/iemocap_audio_text`: `titre` (utterance id), `emotion` (the release's 3-letter codes),
  `to_translate` (transcript), `audio`, `valence` / `activation` / `dominance`. The 4-class set
  gives exactly the release's 5,531.
- `AbstractTTS/IEMOCAP`: `file`, `audio`, `transcription`, `major_emotion` (a word), `EmoVal` /
  `EmoAct` / `EmoDom`. Its majority label is not the release's consensus label: what maps to the 4
  classes is kept, and the counts per session x class are printed beside the published ones.
- `Zahra99/IEMOCAP_Audio`: splits `session1`..`session5`, `audio` and a `label` ClassLabel (ang,
  hap, neu, sad). No utterance ids, no speakers, no text: it trains the audio-only variant, with
  validation drawn at random (no speakers to hold out). Its transcripts are a separate dataset
  (`Zahra99/IEMOCAP_Text`) with no ids to pair them by, and pairing by row order is not safe:
  the text half alone is refused (no audio), and fusion on the audio half is refused at training.

Any other layout needs `--columns` (`id=...,audio=...,label=...,text=...,speaker=...,session=...`)
and, for labels that are not the class names, `--label-map`; without them the error lists the
columns found. Sessions come from a `session` column, else from IEMOCAP ids, else from split
names `session<k>`; splits named train / validation / test make a predefined split.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from emotrain.config import LABEL_NAMES
from emotrain.data.records import AudioInput, Record, Scan
from emotrain.data.shards import DatasetInfo, FoldSpec
from emotrain.data.sources.manifest import ROLES, SPLIT_NAMES, SPLIT_NUMBERS, ManifestError, order_labels
from emotrain.data.sources.release import iemocap_info, parse_utterance_id

WORD_TO_LABEL = {"neutral": "neutral", "neu": "neutral", "happy": "happy", "happiness": "happy", "hap": "happy",
                 "excited": "happy", "exc": "happy", "excitement": "happy", "sad": "sad", "sadness": "sad",
                 "angry": "angry", "anger": "angry", "ang": "angry"}
"""IEMOCAP's 4-class protocol from a label's name, however a mirror spells it (exc merged into happy)."""

PUBLISHED_COUNTS = {
    "session1": {"neutral": 384, "happy": 135 + 143, "sad": 194, "angry": 229},
    "session2": {"neutral": 362, "happy": 117 + 210, "sad": 197, "angry": 137},
    "session3": {"neutral": 320, "happy": 135 + 151, "sad": 305, "angry": 240},
    "session4": {"neutral": 258, "happy": 65 + 238, "sad": 143, "angry": 327},
    "session5": {"neutral": 384, "happy": 143 + 299, "sad": 245, "angry": 170},
}
"""The release's consensus 4-class counts per session (5,531 in all)."""

ZAHRA99_TEXT_REFUSAL = (
    "has transcripts but no audio (Zahra99/IEMOCAP_Text): its audio is a separate dataset "
    "(Zahra99/IEMOCAP_Audio) with no utterance ids, and pairing the two by row order is not safe. Prepare "
    "Zahra99/IEMOCAP_Audio for the audio-only variant, or a mirror with both (Ar4ikov/iemocap_audio_text)")
ZAHRA99_NO_TEXT = (
    "no transcripts: Zahra99/IEMOCAP_Audio has none, and its transcripts (Zahra99/IEMOCAP_Text) cannot be "
    "paired with it: it has no utterance ids, and pairing the two by row order is not safe")


def open_splits(source: str, splits: list[str] | None = None) -> dict[str, Any]:
    """{split name: an iterable dataset} of `source`, streamed (a `save_to_disk` folder is read in place)."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        parts = {name: ds.to_iterable_dataset() for name, ds in loaded.items()}
    else:
        try:
            loaded = datasets.load_dataset(source, streaming=True)
        except Exception as err:  # noqa: BLE001 - FileNotFoundError, DatasetNotFoundError, ConnectionError...
            raise FileNotFoundError(f"cannot open {source!r} with datasets.load_dataset: {type(err).__name__}: "
                                    f"{' '.join(str(err).split())[:300]}") from None
        parts = dict(loaded.items()) if isinstance(loaded, dict) else {"train": loaded}
    if splits:
        unknown = [s for s in splits if s not in parts]
        if unknown:
            raise ManifestError(f"{source}: no split {unknown} (splits: {sorted(parts)})")
        parts = {name: parts[name] for name in splits}
    for name, part in parts.items():
        features = part.features or {}
        for column, feature in features.items():
            if type(feature).__name__ == "Audio":  # bytes as stored: decoded with soundfile, no FFmpeg
                parts[name] = parts[name].cast_column(column, datasets.Audio(decode=False))
    return parts


def detect_layout(columns: set[str], split_names: list[str]) -> str | None:
    if {"titre", "emotion", "to_translate", "audio"} <= columns:
        return "ar4ikov"
    if {"file", "audio", "transcription", "major_emotion"} <= columns:
        return "abstracttts"
    if columns == {"audio", "label"} and all(re.fullmatch(r"session\d+", s) for s in split_names):
        return "zahra99-audio"
    if columns == {"text", "label"} and all(re.fullmatch(r"session\d+", s) for s in split_names):
        return "zahra99-text"
    return None


KNOWN_COLUMNS = {
    "ar4ikov": {"id": "titre", "label": "emotion", "text": "to_translate", "audio": "audio"},
    "abstracttts": {"id": "file", "label": "major_emotion", "text": "transcription", "audio": "audio"},
    "zahra99-audio": {"label": "label", "audio": "audio"},
}
DIMENSIONS = {"ar4ikov": ("valence", "activation", "dominance"), "abstracttts": ("EmoVal", "EmoAct", "EmoDom")}


def _audio_input(value: Any) -> AudioInput:
    if isinstance(value, dict):
        return AudioInput(path=value.get("path"), data=value.get("bytes"))
    if isinstance(value, str):
        return AudioInput(path=value)
    return AudioInput()


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def scan_hub(source: str, *, columns: dict[str, str] | None = None, label_map: dict[str, str] | None = None,
             labels: list[str] | None = None, splits: list[str] | None = None, asr: bool = False) -> Scan:
    """A Hub dataset (or a local copy) as records for the shared writer."""
    parts = open_splits(source, splits)
    found = list(dict.fromkeys(c for part in parts.values() for c in (part.features or {})))
    split_names = list(parts)
    layout = None if columns else detect_layout(set(found), split_names)
    if layout == "zahra99-text":
        raise ManifestError(f"{source} {ZAHRA99_TEXT_REFUSAL}")
    if layout is None and not columns:
        raise ManifestError(f"{source}: not a known IEMOCAP mirror layout (columns found: {found}; splits: "
                            f"{split_names}): name the columns with --columns id=...,audio=...,label=...,text=... "
                            "(and --label-map for labels that are not class names)")
    cols = dict(KNOWN_COLUMNS.get(layout, {}))
    cols.update(columns or {})
    unknown_roles = sorted(set(cols) - set(ROLES))
    if unknown_roles:
        raise ManifestError(f"--columns: unknown role(s) {unknown_roles} (roles: {', '.join(ROLES)})")
    missing = sorted(c for c in cols.values() if c not in found)
    if missing:
        raise ManifestError(f"{source}: no column {missing} (columns found: {found})")
    unnamed = [role for role in ("audio", "label") if role not in cols]
    if unnamed:
        raise ManifestError(f"{source}: no {' and no '.join(unnamed)} column named (columns found: {found}): "
                            f"give --columns {','.join(f'{r}=COLUMN' for r in unnamed)}")
    iemocap = layout is not None
    label_names = {name: (feature.names if type(feature).__name__ == "ClassLabel" else None)
                   for part in parts.values() for name, feature in (part.features or {}).items()}.get(cols["label"])

    def label_of(raw: Any) -> str:
        name = label_names[raw] if label_names is not None and isinstance(raw, int) else str(raw).strip()
        if label_map:
            return label_map.get(name, name)
        return WORD_TO_LABEL.get(name.lower(), "") if iemocap else name

    # Sessions: a session column, IEMOCAP ids, split names `session<k>`, or a predefined split.
    # A single `train` split (most mirrors) is no predefined split: sessions come from the ids.
    split_kind = (all(s.lower() in SPLIT_NAMES for s in split_names) and "session" not in cols
                  and "test" in {SPLIT_NAMES[s.lower()] for s in split_names})
    rows: list[tuple[str, dict]] = []
    read = 0
    records, skipped, dropped = [], [], Counter()
    for split, part in parts.items():
        for index, row in enumerate(_iterate(part)):
            read += 1
            raw_label = row.get(cols["label"])
            label = label_of(raw_label)
            raw_name = (label_names[raw_label] if label_names is not None and isinstance(raw_label, int)
                        else str(raw_label))
            if not label or (labels and label not in labels) or (iemocap and label not in LABEL_NAMES):
                dropped[raw_name] += 1
                continue
            utt_id = str(row.get(cols["id"], "")) if "id" in cols else ""
            utt_id = Path(utt_id).stem if layout == "abstracttts" else utt_id  # `file` is a file name
            utt_id = utt_id or f"{split}_{index:05d}"
            rows.append((split, {"row": row, "id": utt_id, "label": label, "emotion": raw_name}))
    label_set = LABEL_NAMES if iemocap and not labels else order_labels({r["label"] for _, r in rows}, labels)

    groups: dict[str, int] = {}
    for split, item in rows:
        row, utt_id = item["row"], item["id"]
        speaker, dialog = str(row.get(cols["speaker"], "")) if "speaker" in cols else "", ""
        if "session" in cols:
            value = str(row.get(cols["session"], "")).strip()
            digits = re.sub(r"\D", "", value)
            if not digits:
                skipped.append({"id": utt_id, "reason": f"session {value!r} is not a number"})
                continue
            session = int(digits)
            groups[f"session{session}"] = session
        elif re.fullmatch(r"session\d+", split):
            session = int(split[len("session"):])
            groups[split] = session
        elif split_kind:
            session = SPLIT_NUMBERS[SPLIT_NAMES[split.lower()]]
            groups[SPLIT_NAMES[split.lower()]] = session
        else:
            try:
                session, speaker, dialog = parse_utterance_id(utt_id)
            except ValueError:
                skipped.append({"id": utt_id, "reason": "no session: not an IEMOCAP id, and no session column"})
                continue
            groups[f"session{session}"] = session
        if not speaker and "speaker" not in cols:
            try:
                _, speaker, dialog = parse_utterance_id(utt_id)
            except ValueError:
                speaker = ""
        text = row.get(cols["text"]) if "text" in cols else None
        dims = [_float(row.get(c)) for c in DIMENSIONS.get(layout, ())] or [math.nan] * 3
        audio = _audio_input(row.get(cols["audio"]))
        if audio.data is None and audio.path and not Path(audio.path).is_file():
            skipped.append({"id": utt_id, "reason": f"no audio bytes, and no file at {audio.path}"})
            continue
        records.append(Record(id=utt_id, session=session, speaker=speaker, label=label_set.index(item["label"]),
                              emotion=item["emotion"], text=None if text is None else str(text).strip() or None,
                              audio=audio, dialog=dialog, valence=dims[0], activation=dims[1], dominance=dims[2]))
    ids = Counter(r.id for r in records)
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        raise ManifestError(f"{source}: {len(duplicates)} duplicate utterance id(s) ({duplicates[:3]}): name an id "
                            "column with --columns id=COLUMN")

    has_text = "text" in cols or asr
    has_speakers = any(r.speaker for r in records)
    notes = []
    if not has_text:
        notes.append(ZAHRA99_NO_TEXT if layout == "zahra99-audio" else
                     f"no transcripts ({source} has no text column): the audio-only variant trains on it")
    if not has_speakers:
        notes.append("no speakers: validation holds out utterances at random from the training sessions "
                     "(data.validation_fraction), so it may share speakers with training")
    kinds = {"ar4ikov": "Ar4ikov/iemocap_audio_text", "abstracttts": "AbstractTTS/IEMOCAP",
             "zahra99-audio": "Zahra99/IEMOCAP_Audio"}
    description = f"{source}" + (f" ({kinds[layout]} layout)" if layout else "")
    if split_kind and "session" not in cols and not any(re.fullmatch(r"session\d+", s) for s in split_names):
        numbers = set(groups.values())
        info = DatasetInfo(labels=label_set, groups=groups,
                           folds=(FoldSpec(1, (1,), (3,), (2,) if 2 in numbers else ()),), fold_kind="split",
                           has_text=has_text, has_speakers=has_speakers, source=description, notes=tuple(notes))
    elif tuple(label_set) == LABEL_NAMES:
        info = iemocap_info(groups.values(), description, has_text=has_text, has_speakers=has_speakers,
                            notes=tuple(notes))
    else:
        base = iemocap_info(groups.values(), description)
        info = DatasetInfo(labels=label_set, groups=base.groups, folds=base.folds, fold_kind="sessions",
                           has_text=has_text, has_speakers=has_speakers, source=description, notes=tuple(notes))
    extra, lines = {"layout": layout or "columns given"}, []
    if layout == "abstracttts":
        extra["published_counts"] = PUBLISHED_COUNTS
        lines = published_comparison(records, label_set)
    return Scan(source=source, records=records, info=info, read=read, skipped=skipped, dropped_labels=dict(dropped),
                extra=extra, lines=lines)


def _iterate(part) -> Iterator[dict]:
    yield from part


def published_comparison(records: list[Record], label_set) -> list[str]:
    """Counts per session x class of the kept rows, beside the release's consensus counts."""
    counts = Counter((f"session{r.session}", label_set[r.label]) for r in records)
    lines = ["kept / published (the release's consensus labels) per session x class:"]
    lines.append(f"{'':12}" + "".join(f"{name:>14}" for name in LABEL_NAMES))
    for session, published in PUBLISHED_COUNTS.items():
        lines.append(f"{session:12}" + "".join(f"{f'{counts[(session, c)]} / {published[c]}':>14}" for c in LABEL_NAMES))
    return lines
