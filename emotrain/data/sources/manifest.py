"""Any corpus as a manifest (CSV or JSONL), and EmoBox's published fold lists.

A manifest has one row per utterance: the audio path (relative paths are resolved against the
manifest's folder), the transcript, the label and the speaker, and optionally a `session` or
`group` column (then the folds are leave-one-group-out over it) or a `split` column
(`train` / `validation` / `test`: one fold, MSP-Podcast style). Columns are found by these names,
or by others given with `--columns` (`audio=wav,label=emotion,...`):

    id        (optional; default: the audio path without its suffix)
    audio     a path to a sound file soundfile reads (wav, flac, ogg, ...)
    text      the transcript (optional: without one, the data trains the audio-only variant, or a
              speech recogniser transcribes it at prepare time with `--asr`)
    label     the class name as written; `--label-map` renames (`exc=happy,neu=neutral`) and
              `--labels` fixes the set and its order (rows with other labels are counted, not kept)
    speaker   (optional: without it validation holds out utterances at random)
    session / group / split

EmoBox (https://github.com/emo-box/EmoBox) publishes, per corpus, `data/<corpus>/fold_<k>/
<corpus>_{train,test}_fold_<k>.jsonl` (and sometimes `_valid_fold_<k>`) with `key`, `wav` (relative
to the user's download folder), `emo`, `length`, `sample_rate`, `channel` (and `start_time` /
`end_time` for segments of longer files), a `label_map.json` (emo code → class name) and
`data.seg.wrd.stm`, whose third field is the speaker. `scan_emobox` keeps those folds exactly: rows
are grouped by which folds' lists hold them, so fold k tests on its test list and trains on its
train list. Its IEMOCAP speakers are the dialog's (`Ses01F_impro01_M000` → `Ses01F`), not the
speaker's: for IEMOCAP ids the speaker is derived from the id as for the release (counted).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from emotrain.config import LABEL_NAMES, credentials_in
from emotrain.data.records import AudioInput, Record, Scan
from emotrain.data.shards import DatasetInfo, FoldSpec, leave_one_out_folds
from emotrain.data.sources.release import parse_utterance_id

DEFAULT_COLUMNS = {
    "id": ("id", "key", "utterance_id"),
    "audio": ("audio", "wav", "path", "file", "audio_path"),
    "text": ("text", "transcript", "transcription", "sentence"),
    "label": ("label", "emotion", "emo"),
    "speaker": ("speaker", "spk", "speaker_id"),
    "session": ("session",),
    "group": ("group",),
    "split": ("split", "partition", "set"),
}
ROLES = tuple(DEFAULT_COLUMNS)
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "development": "validation", "test": "test",
               "testing": "test", "test1": "test"}
SPLIT_NUMBERS = {"train": 1, "validation": 2, "test": 3}


class ManifestError(ValueError):
    """A manifest (or EmoBox folder) that cannot be prepared: the message says what to change."""


def parse_mapping(text: str | None, what: str) -> dict[str, str]:
    """`"a=b,c=d"` → {"a": "b", "c": "d"} (for --columns and --label-map)."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ManifestError(f"{what}: expected name=value pairs separated by commas, got {part.strip()!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        mapping[key] = value
    return mapping


def order_labels(names, given: list[str] | None = None) -> tuple[str, ...]:
    """The label set: as given, else IEMOCAP's order for IEMOCAP's four classes, else sorted."""
    if given:
        return tuple(given)
    names = set(names)
    return LABEL_NAMES if names == set(LABEL_NAMES) else tuple(sorted(names))


def read_text_file(path: str | Path) -> str:
    """The text of a file a user made (a manifest, a list, a label map): UTF-8, with or without the
    byte-order mark that spreadsheet programs write ("CSV UTF-8"), which would otherwise stick to
    the first column's name. Raises ManifestError, naming the file, for one that cannot be read or
    is not UTF-8."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}): "
                            "save it as UTF-8 (\"CSV UTF-8\" in a spreadsheet program)") from None
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror or err}") from None


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The manifest's rows and column names (CSV with a header, or one JSON object per line)."""
    text = read_text_file(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return list(reader), list(reader.fieldnames or [])
    rows, columns = [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise ManifestError(f"{path} line {number}: not JSON ({err})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{path} line {number}: expected an object, got {row!r}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def resolve_columns(found: list[str], given: dict[str, str], where: str) -> dict[str, str | None]:
    """role → column name (None when absent), from `given` or the default names."""
    unknown = sorted(set(given) - set(ROLES))
    if unknown:
        raise ManifestError(f"--columns: unknown role(s) {unknown} (roles: {', '.join(ROLES)})")
    missing = [column for column in given.values() if column not in found]
    if missing:
        raise ManifestError(f"{where}: no column {missing} (columns found: {found})")
    columns = {role: given.get(role) or next((c for c in DEFAULT_COLUMNS[role] if c in found), None) for role in ROLES}
    for role in ("audio", "label"):
        if columns[role] is None:
            raise ManifestError(f"{where}: no {role} column (looked for {list(DEFAULT_COLUMNS[role])}; columns "
                                f"found: {found}); name it with --columns {role}=COLUMN")
    if columns["session"] and columns["group"] and "group" not in given:
        columns["group"] = None  # a session column decides; a group column is only used when named
    return columns


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", value).strip("_") or "_"


def _group_numbers(values: list[str], role: str) -> dict[str, tuple[str, int]]:
    """value → (folder, group number): IEMOCAP-like integer sessions keep their numbers."""
    distinct = sorted(set(values), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    if all(v.isdigit() and int(v) > 0 for v in distinct):
        return {v: (f"{role}{int(v)}", int(v)) for v in distinct}
    return {v: (f"{role}-{_slug(v)}", i) for i, v in enumerate(distinct, 1)}


def scan_manifest(path: str | Path, *, columns: dict[str, str] | None = None, label_map: dict[str, str] | None = None,
                  labels: list[str] | None = None, asr: bool = False) -> Scan:
    """A manifest's rows as records for the shared writer, with its groups and folds."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"no such manifest: {path}")
    rows, found = _read_rows(path)
    cols = resolve_columns(found, columns or {}, str(path))
    label_map = label_map or {}

    def cell(row: dict, role: str) -> str:
        column = cols[role]
        value = row.get(column) if column else None
        return "" if value is None else str(value).strip()

    mapped = [label_map.get(cell(row, "label"), cell(row, "label")) for row in rows]
    label_set = order_labels((m for m in mapped if m), labels)
    has_text = cols["text"] is not None or asr
    has_speakers = cols["speaker"] is not None

    # Folds: a split column, else sessions or groups.
    if cols["split"]:
        raw = [cell(row, "split").lower() for row in rows]
        bad = sorted({v for v in raw if v not in SPLIT_NAMES})
        if bad:
            raise ManifestError(f"{path}: split values {bad} are not train / validation / test "
                                f"(accepted: {sorted(SPLIT_NAMES)})")
        names = [SPLIT_NAMES[v] for v in raw]
        if "test" not in names or "train" not in names:
            raise ManifestError(f"{path}: the split column needs train and test rows (found {sorted(set(names))})")
        group_of = [SPLIT_NUMBERS[n] for n in names]
        groups = {n: SPLIT_NUMBERS[n] for n in SPLIT_NUMBERS if n in names}
        folds = (FoldSpec(1, (1,), (3,), (2,) if "validation" in names else ()),)
        kind = "split"
    elif cols["session"] or cols["group"]:
        role = "session" if cols["session"] else "group"
        values = [cell(row, role) for row in rows]
        if "" in values:
            raise ManifestError(f"{path}: row {values.index('') + 1} has no {role}")
        numbering = _group_numbers(values, role)
        if len(numbering) < 2:
            raise ManifestError(f"{path}: one {role} only ({values[0]!r}): leave-one-{role}-out needs two or more")
        group_of = [numbering[v][1] for v in values]
        groups = dict(sorted(numbering.values(), key=lambda item: item[1]))
        folds = leave_one_out_folds(sorted(groups.values()))
        kind = "sessions" if role == "session" else "groups"
    else:
        raise ManifestError(f"{path}: no split, session or group column (columns found: {found}): add one "
                            "(e.g. speaker groups for leave-one-group-out) or name it with --columns")

    records, skipped, dropped, ids = [], [], Counter(), Counter()
    for number, (row, label, group) in enumerate(zip(rows, mapped, group_of), 1):
        audio = cell(row, "audio")
        secret = credentials_in(audio) if audio else None
        # (an id derived from an audio path that carries credentials would write them into the shards)
        utt_id = cell(row, "id") or (f"row{number}" if secret else str(Path(audio).with_suffix("").as_posix())) \
            or f"row{number}"
        ids[utt_id] += 1
        if label not in label_set:
            dropped[label or "(empty)"] += 1
            continue
        if not audio or secret:
            skipped.append({"id": utt_id, "reason": f"its audio path carries credentials ({secret}): give them "
                                                    "through the environment" if secret else "no audio path"})
            continue
        resolved = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        text = cell(row, "text") if cols["text"] else None
        records.append(Record(id=utt_id, session=group, speaker=cell(row, "speaker"), label=label_set.index(label),
                              emotion=cell(row, "label"), text=text or None, audio=AudioInput(path=str(resolved))))
    duplicates = [i for i, n in ids.items() if n > 1]
    if duplicates:
        raise ManifestError(f"{path}: {len(duplicates)} duplicate id(s) ({duplicates[:3]}): give an id column")
    notes = []
    if not has_text:
        notes.append(f"no transcripts in {path.name} (no text column): the audio-only variant trains on it; "
                     "add a text column or prepare with --asr")
    if not has_speakers:
        notes.append("no speakers (no speaker column): validation holds out utterances at random")
    info = DatasetInfo(labels=label_set, groups=groups, folds=folds, fold_kind=kind, has_text=has_text,
                       has_speakers=has_speakers, source=f"manifest {path}", notes=tuple(notes))
    return Scan(source=str(path), records=records, info=info, read=len(rows), skipped=skipped,
                dropped_labels=dict(dropped))


# ---------------------------------------------------------------------------------------------
# EmoBox.

FOLD_DIR = re.compile(r"^fold_(\d+)$")
STM_FILE = "data.seg.wrd.stm"
LABEL_MAP_FILE = "label_map.json"


def is_emobox_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(FOLD_DIR.match(p.name) and list(p.glob("*_train_fold_*.jsonl")) for p in path.iterdir())


def _read_jsonl(path: Path) -> list[dict]:
    rows, _ = _read_rows(path)
    return rows


def _read_label_map(path: Path) -> dict[str, str]:
    """EmoBox's `label_map.json` (emo code → class name), names lower-cased."""
    try:
        mapping = json.loads(read_text_file(path))
    except ValueError as err:
        if isinstance(err, ManifestError):
            raise
        raise ManifestError(f"{path} is not JSON ({err}): fix it, or give --label-map") from None
    if not isinstance(mapping, dict):
        raise ManifestError(f"{path}: expected an object of emo code → class name, got {type(mapping).__name__}")
    return {str(k): str(v).lower() for k, v in mapping.items()}


def read_stm_speakers(path: Path) -> dict[str, str]:
    """key → speaker (the third field of each line of EmoBox's `data.seg.wrd.stm`)."""
    speakers = {}
    for line in read_text_file(path).splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith(";;"):
            speakers[fields[0]] = fields[2]
    return speakers


def _read_fold_lists(folder: Path, fold_dirs: list[tuple[int, Path]],
                     ) -> tuple[dict[str, dict], dict[str, dict[str, set[int]]]]:
    """(key → its first list entry, key → {"train", "test", "validation": the folds whose list of
    that role holds it}) over every `fold_<k>/*_{train,test,valid}_fold_<k>.jsonl`."""
    entries: dict[str, dict] = {}
    membership: dict[str, dict[str, set[int]]] = {}
    for k, fold_dir in fold_dirs:
        for part, role in (("train", "train"), ("test", "test"), ("valid", "validation")):
            files = sorted(fold_dir.glob(f"*_{part}_fold_{k}.jsonl"))
            if not files and role != "validation":
                raise ManifestError(f"{fold_dir}: no *_{part}_fold_{k}.jsonl")
            for file in files:
                for entry in _read_jsonl(file):
                    key = str(entry.get("key", ""))
                    if not key:
                        raise ManifestError(f"{file}: a line without `key`")
                    entries.setdefault(key, entry)
                    membership.setdefault(key, {"train": set(), "test": set(), "validation": set()})[role].add(k)
    both = [key for key, m in membership.items() if m["train"] & m["test"]]
    if both:
        raise ManifestError(f"{folder}: {len(both)} key(s) in the train and test lists of the same fold ({both[:3]})")
    return entries, membership


def _emobox_groups(membership: dict[str, dict[str, set[int]]], numbers: list[int],
                   ) -> tuple[dict[str, int], dict[int, str], list[FoldSpec]]:
    """(key → group number, group number → folder name, the folds over the groups).

    A group is the keys that the fold lists treat alike. Fold k's own test set, trained on by every
    other fold, is `fold<k>`, numbered k; any other combination gets a group of its own."""
    signatures: dict[tuple, int] = {}
    group_names: dict[int, str] = {}
    group_of: dict[str, int] = {}
    for key in sorted(membership):
        m = membership[key]
        signature = (tuple(sorted(m["test"])), tuple(sorted(m["train"])), tuple(sorted(m["validation"])))
        if signature not in signatures:
            canonical = (len(m["test"]) == 1 and not m["validation"]
                         and m["train"] == set(numbers) - m["test"])
            number = next(iter(m["test"])) if canonical else 1000 + len(signatures)
            signatures[signature] = number
            group_names[number] = f"fold{number}" if canonical else f"group{len(signatures)}"
        group_of[key] = signatures[signature]

    def holding(k: int, role: str) -> tuple[int, ...]:
        return tuple(sorted(number for (test, train, validation), number in signatures.items()
                            if k in {"test": test, "train": train, "validation": validation}[role]))

    folds = [FoldSpec(k, holding(k, "train"), holding(k, "test"), holding(k, "validation")) for k in numbers]
    return group_of, group_names, folds


def scan_emobox(folder: str | Path, download_root: str | Path | None, *, label_map: dict[str, str] | None = None,
                labels: list[str] | None = None, text_column: str | None = None, asr: bool = False) -> Scan:
    """EmoBox's lists for one corpus (`data/<corpus>`), with wav paths under `download_root`."""
    folder = Path(folder)
    if download_root is None:
        raise ManifestError(f"{folder} is an EmoBox folder: give --download-root, the folder its `wav` paths "
                            "are relative to")
    download_root = Path(download_root)
    fold_dirs = sorted(((int(m[1]), p) for p in folder.iterdir() if (m := FOLD_DIR.match(p.name))), key=lambda t: t[0])
    entries, membership = _read_fold_lists(folder, fold_dirs)
    numbers = [k for k, _ in fold_dirs]

    # Label names: EmoBox's label_map.json (emo code → class), lower-cased, unless --label-map says.
    label_map_file = folder / LABEL_MAP_FILE
    if label_map is None and label_map_file.is_file():
        label_map = _read_label_map(label_map_file)
    label_map = label_map or {}
    mapped = {key: label_map.get(str(e.get("emo", "")), str(e.get("emo", ""))) for key, e in entries.items()}
    if labels is None and label_map:
        in_map = list(dict.fromkeys(label_map.values()))
        label_set = LABEL_NAMES if set(in_map) == set(LABEL_NAMES) else tuple(in_map)
    else:
        label_set = order_labels((m for m in mapped.values() if m), labels)

    stm = folder / STM_FILE
    stm_speakers = read_stm_speakers(stm) if stm.is_file() else {}
    has_speakers = bool(stm_speakers)

    group_of, group_names, folds = _emobox_groups(membership, numbers)

    records, skipped, dropped = [], [], Counter()
    corrected = 0
    for key in sorted(entries):
        entry = entries[key]
        dataset = str(entry.get("dataset", ""))
        utt_id = key[len(dataset) + 1:] if dataset and key.startswith(f"{dataset}-") else key
        label = mapped[key]
        if label not in label_set:
            dropped[str(entry.get("emo", "")) or "(empty)"] += 1
            continue
        speaker = stm_speakers.get(key, "")
        try:  # IEMOCAP: EmoBox's speaker is the dialog's; the id says who speaks
            _, true_speaker, _ = parse_utterance_id(utt_id)
        except ValueError:
            true_speaker = None
        if true_speaker is not None and has_speakers:
            corrected += true_speaker != speaker
            speaker = true_speaker
        wav = str(entry.get("wav", ""))
        if not wav:
            skipped.append({"id": utt_id, "reason": "no wav path"})
            continue
        resolved = Path(wav) if Path(wav).is_absolute() else download_root / wav
        start, end = entry.get("start_time"), entry.get("end_time")
        text = entry.get(text_column) if text_column else None
        records.append(Record(
            id=utt_id, session=group_of[key], speaker=speaker, label=label_set.index(label),
            emotion=str(entry.get("emo", "")), text=None if text is None else str(text).strip() or None,
            audio=AudioInput(path=str(resolved), start=None if start is None else float(start),
                             end=None if end is None else float(end))))
    has_text = text_column is not None or asr
    notes = []
    if not has_text:
        notes.append("no transcripts (EmoBox carries none): the audio-only variant trains on it; add a text "
                     "field to the lists (--columns text=FIELD) or prepare with --asr")
    if not has_speakers:
        notes.append(f"no speakers ({STM_FILE} missing): validation holds out utterances at random")
    info = DatasetInfo(labels=label_set, groups={group_names[n]: n for n in sorted(group_names)}, folds=tuple(folds),
                       fold_kind="emobox", has_text=has_text, has_speakers=has_speakers,
                       source=f"EmoBox {folder.name} ({folder}), audio under {download_root}", notes=tuple(notes))
    extra = {"emobox_folds": {str(f.number): {"train": sum(group_of[k] in f.train for k in group_of),
                                              "test": sum(group_of[k] in f.test for k in group_of)} for f in folds}}
    lines = [f"EmoBox folds {numbers}: " + ", ".join(f"fold {k} train {v['train']} / test {v['test']}"
                                                    for k, v in extra["emobox_folds"].items())]
    if corrected:
        extra["stm_speakers_corrected"] = corrected
        lines.append(f"speakers: {corrected} of EmoBox's stm speakers name the dialog, not the speaker; "
                     "derived from the utterance id instead (as for the release)")
    return Scan(source=str(folder), records=records, info=info, read=len(entries), skipped=skipped,
                dropped_labels=dict(dropped), extra=extra, lines=lines)
