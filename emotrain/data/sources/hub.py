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
from dataclasses import dataclass
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
MIRROR_NAMES = {"ar4ikov": "Ar4ikov/iemocap_audio_text", "abstracttts": "AbstractTTS/IEMOCAP",
                "zahra99-audio": "Zahra99/IEMOCAP_Audio"}


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


@dataclass(frozen=True)
class HubLayout:
    """How a Hub dataset's rows are read: which known mirror it is (None: columns given), the
    column of each role, and how its labels turn into class names."""

    source: str
    mirror: str | None
    """A key of KNOWN_COLUMNS, or None when the columns were named with --columns."""
    columns: dict[str, str]
    """Role (ROLES) → column name."""
    class_names: list[str] | None
    """The label column's ClassLabel names (its values are then integers); None for names as written."""
    label_map: dict[str, str] | None

    @property
    def iemocap(self) -> bool:
        """A known IEMOCAP mirror: labels normalised to the 4-class protocol (WORD_TO_LABEL)."""
        return self.mirror is not None

    def raw_name(self, raw: Any) -> str:
        """The label as the dataset wrote it (a ClassLabel integer as its name): the `emotion` column."""
        return self.class_names[raw] if self.class_names is not None and isinstance(raw, int) else str(raw)

    def label_of(self, raw: Any) -> str:
        """The class name of a label value; "" when an IEMOCAP mirror's label has no 4-class name."""
        name = self.class_names[raw] if self.class_names is not None and isinstance(raw, int) else str(raw).strip()
        if self.label_map:
            return self.label_map.get(name, name)
        return WORD_TO_LABEL.get(name.lower(), "") if self.iemocap else name


def read_layout(source: str, parts: dict[str, Any], columns: dict[str, str] | None,
                label_map: dict[str, str] | None) -> HubLayout:
    """The layout of the opened splits: a known mirror recognised by its columns, or the columns
    given. Raises ManifestError naming the columns found when neither says where audio and labels are."""
    found = list(dict.fromkeys(c for part in parts.values() for c in (part.features or {})))
    split_names = list(parts)
    mirror = None if columns else detect_layout(set(found), split_names)
    if mirror == "zahra99-text":
        raise ManifestError(f"{source} {ZAHRA99_TEXT_REFUSAL}")
    if mirror is None and not columns:
        raise ManifestError(f"{source}: not a known IEMOCAP mirror layout (columns found: {found}; splits: "
                            f"{split_names}): name the columns with --columns id=...,audio=...,label=...,text=... "
                            "(and --label-map for labels that are not class names)")
    cols = dict(KNOWN_COLUMNS.get(mirror, {}))
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
    class_names = {name: (feature.names if type(feature).__name__ == "ClassLabel" else None)
                   for part in parts.values() for name, feature in (part.features or {}).items()}.get(cols["label"])
    return HubLayout(source, mirror, cols, class_names, label_map)


def _labelled_rows(parts: dict[str, Any], layout: HubLayout,
                   labels: list[str] | None) -> tuple[list[tuple[str, dict]], int, Counter]:
    """([(split, {"row", "id", "label", "emotion"})] of the rows with a label in the set, the rows
    read, the rows dropped per label as written)."""
    cols = layout.columns
    rows: list[tuple[str, dict]] = []
    read = 0
    dropped: Counter = Counter()
    for split, part in parts.items():
        for index, row in enumerate(_iterate(part)):
            read += 1
            raw_label = row.get(cols["label"])
            label = layout.label_of(raw_label)
            raw_name = layout.raw_name(raw_label)
            if not label or (labels and label not in labels) or (layout.iemocap and label not in LABEL_NAMES):
                dropped[raw_name] += 1
                continue
            utt_id = str(row.get(cols["id"], "")) if "id" in cols else ""
            utt_id = Path(utt_id).stem if layout.mirror == "abstracttts" else utt_id  # `file` is a file name
            utt_id = utt_id or f"{split}_{index:05d}"
            rows.append((split, {"row": row, "id": utt_id, "label": label, "emotion": raw_name}))
    return rows, read, dropped


def _is_predefined_split(split_names: list[str], cols: dict[str, str]) -> bool:
    """Splits named train / validation / test (with a test split) and no session column: one fold.
    A single `train` split (most mirrors) is no predefined split: sessions come from the ids."""
    return (all(s.lower() in SPLIT_NAMES for s in split_names) and "session" not in cols
            and "test" in {SPLIT_NAMES[s.lower()] for s in split_names})


class _NoGroup(ValueError):
    """A row whose group cannot be told: the message is its `skipped` reason."""


def _group_of(split: str, row: dict, utt_id: str, cols: dict[str, str], predefined_split: bool) -> tuple[str, int]:
    """(group name, group number) of a row: from a session column, else a split named `session<k>`,
    else a predefined split, else the IEMOCAP id. Raises _NoGroup."""
    if "session" in cols:
        value = str(row.get(cols["session"], "")).strip()
        digits = re.sub(r"\D", "", value)
        if not digits:
            raise _NoGroup(f"session {value!r} is not a number")
        return f"session{int(digits)}", int(digits)
    if re.fullmatch(r"session\d+", split):
        return split, int(split[len("session"):])
    if predefined_split:
        name = SPLIT_NAMES[split.lower()]
        return name, SPLIT_NUMBERS[name]
    try:
        session, _, _ = parse_utterance_id(utt_id)
    except ValueError:
        raise _NoGroup("no session: not an IEMOCAP id, and no session column") from None
    return f"session{session}", session


def _grouped_by_id(split: str, cols: dict[str, str], predefined_split: bool) -> bool:
    """Whether `_group_of` takes a row's session from its IEMOCAP id (then so are speaker and dialog)."""
    return "session" not in cols and not re.fullmatch(r"session\d+", split) and not predefined_split


def _speaker_and_dialog(row: dict, utt_id: str, cols: dict[str, str], grouped_by_id: bool) -> tuple[str, str]:
    """The speaker and dialog an IEMOCAP id names when the session came from it too, else the speaker
    column's value (no dialog), else what the id names, if it is an IEMOCAP id."""
    if "speaker" in cols and not grouped_by_id:
        return str(row.get(cols["speaker"], "")), ""
    try:
        _, speaker, dialog = parse_utterance_id(utt_id)
    except ValueError:
        return "", ""
    return speaker, dialog


def _records(rows: list[tuple[str, dict]], layout: HubLayout, label_set, predefined_split: bool,
             ) -> tuple[list[Record], dict[str, int], list[dict]]:
    """(records, groups {name: number}, skipped) of the labelled rows. A group is counted once a row
    is placed in it, even when that row's audio is then missing (the writer drops empty groups)."""
    cols = layout.columns
    records, groups, skipped = [], {}, []
    for split, item in rows:
        row, utt_id = item["row"], item["id"]
        try:
            name, session = _group_of(split, row, utt_id, cols, predefined_split)
        except _NoGroup as reason:
            skipped.append({"id": utt_id, "reason": str(reason)})
            continue
        groups[name] = session
        speaker, dialog = _speaker_and_dialog(row, utt_id, cols, _grouped_by_id(split, cols, predefined_split))
        text = row.get(cols["text"]) if "text" in cols else None
        dims = [_float(row.get(c)) for c in DIMENSIONS.get(layout.mirror, ())] or [math.nan] * 3
        audio = _audio_input(row.get(cols["audio"]))
        if audio.data is None and audio.path and not Path(audio.path).is_file():
            skipped.append({"id": utt_id, "reason": f"no audio bytes, and no file at {audio.path}"})
            continue
        records.append(Record(id=utt_id, session=session, speaker=speaker, label=label_set.index(item["label"]),
                              emotion=item["emotion"], text=None if text is None else str(text).strip() or None,
                              audio=audio, dialog=dialog, valence=dims[0], activation=dims[1], dominance=dims[2]))
    duplicates = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if duplicates:
        raise ManifestError(f"{layout.source}: {len(duplicates)} duplicate utterance id(s) ({duplicates[:3]}): name an "
                            "id column with --columns id=COLUMN")
    return records, groups, skipped


def _dataset_info(layout: HubLayout, records: list[Record], groups: dict[str, int], label_set,
                  split_names: list[str], predefined_split: bool, asr: bool) -> DatasetInfo:
    """The description: one fold over a predefined split, else leave-one-session-out over the groups."""
    has_text = "text" in layout.columns or asr
    has_speakers = any(r.speaker for r in records)
    notes = []
    if not has_text:
        notes.append(ZAHRA99_NO_TEXT if layout.mirror == "zahra99-audio" else
                     f"no transcripts ({layout.source} has no text column): the audio-only variant trains on it")
    if not has_speakers:
        notes.append("no speakers: validation holds out utterances at random from the training sessions "
                     "(data.validation_fraction), so it may share speakers with training")
    description = layout.source + (f" ({MIRROR_NAMES[layout.mirror]} layout)" if layout.mirror else "")
    if predefined_split and not any(re.fullmatch(r"session\d+", s) for s in split_names):
        numbers = set(groups.values())
        return DatasetInfo(labels=label_set, groups=groups,
                           folds=(FoldSpec(1, (1,), (3,), (2,) if 2 in numbers else ()),), fold_kind="split",
                           has_text=has_text, has_speakers=has_speakers, source=description, notes=tuple(notes))
    if tuple(label_set) == LABEL_NAMES:
        return iemocap_info(groups.values(), description, has_text=has_text, has_speakers=has_speakers,
                            notes=tuple(notes))
    base = iemocap_info(groups.values(), description)
    return DatasetInfo(labels=label_set, groups=base.groups, folds=base.folds, fold_kind="sessions",
                       has_text=has_text, has_speakers=has_speakers, source=description, notes=tuple(notes))


def scan_hub(source: str, *, columns: dict[str, str] | None = None, label_map: dict[str, str] | None = None,
             labels: list[str] | None = None, splits: list[str] | None = None, asr: bool = False) -> Scan:
    """A Hub dataset (or a local copy) as records for the shared writer."""
    parts = open_splits(source, splits)
    layout = read_layout(source, parts, columns, label_map)
    rows, read, dropped = _labelled_rows(parts, layout, labels)
    label_set = (LABEL_NAMES if layout.iemocap and not labels
                 else order_labels({item["label"] for _, item in rows}, labels))
    split_names = list(parts)
    predefined_split = _is_predefined_split(split_names, layout.columns)
    records, groups, skipped = _records(rows, layout, label_set, predefined_split)
    info = _dataset_info(layout, records, groups, label_set, split_names, predefined_split, asr)
    extra, lines = {"layout": layout.mirror or "columns given"}, []
    if layout.mirror == "abstracttts":
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
