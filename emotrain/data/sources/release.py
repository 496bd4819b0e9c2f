"""Reading an `IEMOCAP_full_release` tree into utterance records (the 4-class protocol).

Only the consensus files `Session*/dialog/EmoEvaluation/<dialog>.txt` carry labels; transcripts
come from `dialog/transcriptions/<dialog>.txt`; audio from `sentences/wav/<dialog>/<utterance>.wav`.
Quirks handled (see the lead's notes on the release):
- macOS AppleDouble files (`._name`) beside real ones are skipped;
- session and speaker are derived from the utterance id, never from fixed character positions:
  `Ses03M_impro05a_F012` is spoken by `Ses03F` (the letter before the 3 digits), not `Ses03M`;
- transcript lines without a label (`..._MXX0`) or without times are ignored;
- `exc` is merged into happy; every other code outside {neu, hap, exc, sad, ang} is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from emotrain.config import LABEL_NAMES
from emotrain.data.records import AudioInput, Record, Scan
from emotrain.data.shards import DatasetInfo, leave_one_out_folds

CODE_TO_LABEL = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
"""The 4-class protocol: excited is merged into happy."""

UTTERANCE_ID = re.compile(r"^(?P<dialog>Ses(?P<session>\d{2})[FM]_\w+?)_(?P<speaker>[FM])(?P<number>\d{3})$")
# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`
EVALUATION_LINE = re.compile(
    r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\s+(?P<id>\S+)\s+(?P<code>\w+)\s+"
    r"\[(?P<v>[\d.]+),\s*(?P<a>[\d.]+),\s*(?P<d>[\d.]+)\]"
)
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.`
TRANSCRIPT_LINE = re.compile(r"^(?P<id>\S+)\s+\[[\d.]+-[\d.]+\]:\s?(?P<text>.*)$")


@dataclass(frozen=True)
class Utterance:
    """One labelled utterance of the release (before its audio is read)."""

    id: str
    session: int
    speaker: str
    dialog: str
    emotion: str
    """The consensus code as written in the release (`exc`, `neu`, ...)."""
    valence: float
    activation: float
    dominance: float
    text: str | None
    """The transcript, or None when the utterance has no transcription line."""
    wav_path: Path

    @property
    def label(self) -> int:
        return LABEL_NAMES.index(CODE_TO_LABEL[self.emotion])


def parse_utterance_id(utterance_id: str) -> tuple[int, str, str]:
    """`Ses03M_impro05a_F012` → (3, "Ses03F", "Ses03M_impro05a"): session, true speaker, dialog."""
    match = UTTERANCE_ID.match(utterance_id)
    if match is None:
        raise ValueError(f"not an IEMOCAP utterance id: {utterance_id!r}")
    session = int(match["session"])
    return session, f"Ses{match['session']}{match['speaker']}", match["dialog"]


def _real_files(folder: Path, suffix: str) -> list[Path]:
    """Files with `suffix` in folder, without macOS AppleDouble companions (`._name`)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{suffix}") if p.is_file() and not p.name.startswith("._"))


def read_evaluation(path: Path) -> list[dict]:
    """Consensus summary lines of one EmoEvaluation file (annotator lines are ignored)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = EVALUATION_LINE.match(line.strip())
        if match:
            rows.append(
                {
                    "id": match["id"],
                    "code": match["code"],
                    "valence": float(match["v"]),
                    "activation": float(match["a"]),
                    "dominance": float(match["d"]),
                }
            )
    return rows


def read_transcripts(path: Path) -> dict[str, str]:
    """Utterance id → transcript text for one dialog (lines without times are skipped)."""
    texts = {}
    if not path.is_file():
        return texts
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = TRANSCRIPT_LINE.match(line.strip())
        if match:
            texts[match["id"]] = match["text"].strip()
    return texts


def find_sessions(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("Session[1-5]") if p.is_dir())


def scan_release(root: str | Path) -> tuple[list[Utterance], dict[str, int]]:
    """All labelled utterances of the 4-class set, and how many others were dropped per code.

    Raises FileNotFoundError when `root` has no `Session1..5` folders.
    """
    sessions = find_sessions(root)
    if not sessions:
        raise FileNotFoundError(
            f"{root} holds no Session1..Session5 folders: point at the IEMOCAP_full_release folder"
        )
    kept: dict[str, Utterance] = {}
    dropped: dict[str, int] = {}
    for session_dir in sessions:
        for evaluation in _real_files(session_dir / "dialog" / "EmoEvaluation", ".txt"):
            dialog_name = evaluation.stem
            texts = read_transcripts(session_dir / "dialog" / "transcriptions" / f"{dialog_name}.txt")
            for row in read_evaluation(evaluation):
                if row["code"] not in CODE_TO_LABEL:
                    dropped[row["code"]] = dropped.get(row["code"], 0) + 1
                    continue
                session, speaker, dialog = parse_utterance_id(row["id"])
                kept[row["id"]] = Utterance(
                    id=row["id"],
                    session=session,
                    speaker=speaker,
                    dialog=dialog,
                    emotion=row["code"],
                    valence=row["valence"],
                    activation=row["activation"],
                    dominance=row["dominance"],
                    text=texts.get(row["id"]),
                    wav_path=session_dir / "sentences" / "wav" / dialog / f"{row['id']}.wav",
                )
    return sorted(kept.values(), key=lambda u: u.id), dict(sorted(dropped.items()))


def iemocap_info(sessions, source: str, **changes) -> DatasetInfo:
    """IEMOCAP's description over the sessions present: 4 classes, leave-one-session-out."""
    sessions = sorted(sessions)
    return DatasetInfo(labels=LABEL_NAMES, groups={f"session{s}": s for s in sessions},
                       folds=leave_one_out_folds(sessions), fold_kind="sessions", source=source, **changes)


def scan_release_records(root: str | Path) -> Scan:
    """The release as records for the shared writer (`emotrain.data.prepare.write_prepared`)."""
    utterances, dropped = scan_release(root)
    records, skipped = [], []
    for utt in utterances:
        if utt.text is None:
            skipped.append({"id": utt.id, "reason": "no transcription line"})
            continue
        records.append(Record(id=utt.id, session=utt.session, speaker=utt.speaker, label=utt.label,
                              emotion=utt.emotion, text=utt.text, audio=AudioInput(path=str(utt.wav_path)),
                              dialog=utt.dialog, valence=utt.valence, activation=utt.activation,
                              dominance=utt.dominance))
    return Scan(source=str(root), records=records, skipped=skipped, dropped_labels=dropped,
                read=len(utterances) + sum(dropped.values()),
                info=iemocap_info({u.session for u in utterances}, source=describe_release(root)))


def describe_release(root: str | Path) -> str:
    """What the tree at `root` is: IEMOCAP, or emotrain's synthetic corpus in its layout."""
    from emotrain.data.synth import read_synth_marker

    marker = read_synth_marker(root)
    if marker is None:
        return f"IEMOCAP release at {root}"
    return (f"emotrain's synthetic corpus (`emotrain synth`, seed {marker.get('seed', '?')}) in the IEMOCAP "
            f"release layout at {root}: generated signals and sentences, not IEMOCAP recordings")
