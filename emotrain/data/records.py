"""What a source hands the writer: utterance records before their audio is read, and the scan
that holds them.

Every source (`emotrain.data.sources`: the IEMOCAP release, a Hub dataset, a manifest, EmoBox's
fold lists) yields a `Scan`; `emotrain.data.prepare.write_prepared` turns any of them into the
same prepared layout. The types live here, below both, so neither imports the other for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from emotrain.data.shards import DatasetInfo


@dataclass(frozen=True)
class AudioInput:
    """Where an utterance's audio is: a file (optionally a segment of it), or encoded bytes."""

    path: str | None = None
    data: bytes | None = None
    start: float | None = None
    end: float | None = None
    """Seconds into the file (EmoBox's segments of longer recordings); None: the whole file."""


@dataclass
class Record:
    """One labelled utterance as a source yields it, before its audio is read."""

    id: str
    session: int
    """The group number (a session, a speaker group, a split): the `session` column."""
    speaker: str
    label: int
    """Index into the dataset's labels."""
    emotion: str
    """The label as the source wrote it (`exc`, `Happy`, 3, ...)."""
    text: str | None
    """The transcript; None when the source has none for it."""
    audio: AudioInput
    dialog: str = ""
    valence: float = math.nan
    activation: float = math.nan
    dominance: float = math.nan


@dataclass
class Scan:
    """What a source found: the records to prepare, the rows it could not use, and the dataset's
    description (groups and folds over the records' group numbers)."""

    source: str
    records: list[Record]
    info: DatasetInfo
    read: int
    """Rows (utterances) the source read, kept or not."""
    skipped: list[dict] = field(default_factory=list)
    """`{"id", "reason"}` for rows left out before their audio was read."""
    dropped_labels: dict[str, int] = field(default_factory=dict)
    """Rows whose label is outside the label set, per label (not prepared, not a fault)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific report entries (e.g. a mirror's counts against the published ones)."""
    lines: list[str] = field(default_factory=list)
    """Source-specific lines for the console summary."""
