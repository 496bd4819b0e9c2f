"""Leave-one-session-out folds over a prepared dataset, computed from light columns only.

    split = make_fold_split("runs/synthetic/prepared", fold=3, validation="speakers",
                            validation_speakers=1, seed=42)
    split.train_files        # the Parquet shards of sessions 1, 2, 4, 5
    split.validation_ids     # held out of those four sessions (whole speakers, drawn by seed)
    split.test_ids           # every utterance of session 3 (None when fold=0)

Fold k in 1..5 tests on session k; the other four sessions train, minus a validation set drawn from
them only (model selection on the test session inflates results). Fold 0 has no test split: all
five sessions train, minus validation. Only `id, session, speaker, label, duration` are read
(plus each row's position in its shard, which the training stream plans with); audio is never
touched here. Files are listed with fsspec, so `path` may be a local folder or any fsspec URL
(`s3://...`, `hf://datasets/...`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow.parquet as pq

from emotrain.config import LABEL_NAMES, ConfigError, DataConfig

SESSIONS = (1, 2, 3, 4, 5)
META_COLUMNS = ("id", "session", "speaker", "label", "duration")


@dataclass(frozen=True)
class Metadata:
    """Light columns of every prepared row, as numpy arrays aligned by row.

    `file` indexes `files`; `row` is the row's position inside that Parquet file.
    """

    files: tuple[str, ...]
    file_session: tuple[int, ...]
    """The session (folder) of each file, empty shards included."""
    id: np.ndarray  # object (str)
    session: np.ndarray  # int32
    speaker: np.ndarray  # object (str)
    label: np.ndarray  # int64
    duration: np.ndarray  # float64, seconds
    file: np.ndarray  # int64, index into `files`
    row: np.ndarray  # int64, row index inside the file

    def __len__(self) -> int:
        return len(self.id)


@dataclass(frozen=True)
class FoldSplit:
    """One fold's split. Ids are sorted tuples; `meta` holds the light columns of all sessions."""

    fold: int
    seed: int
    validation_mode: str
    train_sessions: tuple[int, ...]
    train_files: tuple[str, ...]
    """Parquet shards of the training sessions (validation rows inside them are filtered out)."""
    validation_ids: tuple[str, ...]
    validation_speakers: tuple[str, ...]
    """With validation=speakers: the held-out speakers; empty with validation=fraction."""
    test_session: int | None
    test_ids: tuple[str, ...] | None
    meta: Metadata = field(repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return int(self.train_mask().sum())

    @property
    def num_validation(self) -> int:
        return len(self.validation_ids)

    @property
    def num_test(self) -> int:
        return 0 if self.test_ids is None else len(self.test_ids)

    def train_mask(self) -> np.ndarray:
        """Boolean mask over `meta` rows: training sessions minus validation."""
        in_train = np.isin(self.meta.session, self.train_sessions)
        held_out = np.isin(self.meta.id, np.array(self.validation_ids, dtype=object))
        return in_train & ~held_out

    def train_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.meta.id[self.train_mask()].tolist()))

    def fingerprint(self) -> str:
        """A short hash of the split (which ids train, validate, test)."""
        payload = json.dumps(
            [self.fold, self.train_ids(), self.validation_ids, self.test_ids], separators=(",", ":")
        )
        return hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable description for logs and the run folder."""
        train = self.train_mask()
        return {
            "fold": self.fold,
            "seed": self.seed,
            "validation": self.validation_mode,
            "train_sessions": list(self.train_sessions),
            "test_session": self.test_session,
            "num_train_files": len(self.train_files),
            "num_train": int(train.sum()),
            "num_validation": self.num_validation,
            "num_test": self.num_test,
            "validation_speakers": list(self.validation_speakers),
            "train_label_counts": {
                name: int((self.meta.label[train] == i).sum()) for i, name in enumerate(LABEL_NAMES)
            },
            "train_hours": float(self.meta.duration[train].sum() / 3600.0),
            "fingerprint": self.fingerprint(),
        }


class NoPreparedDataset(ConfigError, FileNotFoundError):
    """data.path holds no prepared shards (of one session, or at all): `emotrain prepare` first.

    A ConfigError naming `data.path` (the CLI prints it as one line, exit code 2) and still a
    FileNotFoundError for callers that catch that.
    """

    def __init__(self, path: str, session: int | None = None):
        what = "no prepared dataset" if session is None else f"no prepared shards for session {session}"
        super().__init__(
            "data.path",
            f"{what} at {path}: run `emotrain synth ...` then `emotrain prepare ...` (or set data.path)",
        )


def list_session_files(path: str, session: int) -> list[str]:
    """The Parquet shards of one prepared session, sorted, as paths/URLs `datasets` and fsspec open."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        pattern = f"{root.rstrip('/')}/session{session}/data-*.parquet"
        found = sorted(fs.glob(pattern))
        # Nothing prepared at all is the common mistake (train before prepare): say that.
        anything = found or fs.glob(f"{root.rstrip('/')}/session*/data-*.parquet")
    except Exception as err:  # no credentials, access denied, no such bucket, endpoint down: one line
        from emotrain.data.shards import storage_error  # here: shards imports `datasets` (a second)

        error = storage_error(path, err)
        if error is None:
            raise
        raise error from err
    if not found:
        raise NoPreparedDataset(path, session if anything else None)
    # Local paths stay plain; remote ones get their protocol back (`s3://...`, `hf://...`).
    if "file" in _protocols(fs):
        return found
    return [fs.unstrip_protocol(p) for p in found]


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def read_parquet(url: str, columns: list[str] | tuple[str, ...]):
    """Read some columns of one Parquet file through fsspec (local or remote)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=list(columns))


def check_prepared(path: str) -> None:
    """Raise NoPreparedDataset unless every session has shards at `path` (lists files, reads none)."""
    for session in SESSIONS:
        list_session_files(path, session)


def read_metadata(path: str, sessions: tuple[int, ...] = SESSIONS) -> Metadata:
    """Read the light columns of the given sessions' shards (no audio).

    Raises NoPreparedDataset (a ConfigError and a FileNotFoundError) when `path` holds none.
    """
    files: list[str] = []
    file_session: list[int] = []
    parts: dict[str, list] = {name: [] for name in META_COLUMNS + ("file", "row")}
    for session in sessions:
        for url in list_session_files(path, session):
            table = read_parquet(url, META_COLUMNS)
            n = table.num_rows
            for name in META_COLUMNS:
                parts[name].extend(table.column(name).to_pylist())
            parts["file"].extend([len(files)] * n)
            parts["row"].extend(range(n))
            files.append(url)
            file_session.append(session)
    return Metadata(
        files=tuple(files),
        file_session=tuple(file_session),
        id=np.array(parts["id"], dtype=object),
        session=np.array(parts["session"], dtype=np.int32),
        speaker=np.array(parts["speaker"], dtype=object),
        label=np.array(parts["label"], dtype=np.int64),
        duration=np.array(parts["duration"], dtype=np.float64),
        file=np.array(parts["file"], dtype=np.int64),
        row=np.array(parts["row"], dtype=np.int64),
    )


def make_fold_split(
    path: str,
    fold: int,
    validation: Literal["speakers", "fraction"] = "speakers",
    validation_speakers: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 42,
    meta: Metadata | None = None,
) -> FoldSplit:
    """Compute fold `fold`'s split of the prepared dataset at `path` (see the module docstring).

    The validation draw depends on (seed, fold) only, never on file order or the machine.
    """
    if not 0 <= fold <= 5:
        raise ValueError(f"fold must be 0..5, got {fold}")
    meta = meta if meta is not None else read_metadata(path)
    if len(set(meta.id.tolist())) != len(meta):
        raise ValueError(f"duplicate utterance ids in the prepared dataset at {path}")
    test_session = fold if fold else None
    train_sessions = tuple(s for s in SESSIONS if s != test_session)
    in_train = np.isin(meta.session, train_sessions)
    # Every shard of a training session, empty ones included: shard counts decide rank sharding.
    train_files = tuple(f for f, s in zip(meta.files, meta.file_session) if s in train_sessions)

    rng = np.random.default_rng([seed, fold, 0x5E1EC7])
    held_speakers: tuple[str, ...] = ()
    if validation == "speakers":
        speakers = sorted(set(meta.speaker[in_train].tolist()))
        if validation_speakers >= len(speakers):
            raise ValueError(
                f"data.validation_speakers={validation_speakers} leaves no training speaker "
                f"(fold {fold} trains on {len(speakers)} speakers)"
            )
        held_speakers = tuple(sorted(rng.choice(speakers, size=validation_speakers, replace=False).tolist()))
        val_mask = in_train & np.isin(meta.speaker, held_speakers)
        validation_ids = tuple(sorted(meta.id[val_mask].tolist()))
    elif validation == "fraction":
        candidates = sorted(meta.id[in_train].tolist())
        count = int(round(validation_fraction * len(candidates)))
        count = min(max(count, 1), len(candidates) - 1) if len(candidates) > 1 else 0
        chosen = rng.choice(len(candidates), size=count, replace=False) if count else []
        validation_ids = tuple(sorted(candidates[i] for i in chosen))
    else:
        raise ValueError(f"validation must be 'speakers' or 'fraction', got {validation!r}")

    test_ids = None
    if test_session is not None:
        test_ids = tuple(sorted(meta.id[meta.session == test_session].tolist()))
    return FoldSplit(
        fold=fold,
        seed=seed,
        validation_mode=validation,
        train_sessions=train_sessions,
        train_files=train_files,
        validation_ids=validation_ids,
        validation_speakers=held_speakers,
        test_session=test_session,
        test_ids=test_ids,
        meta=meta,
    )


def split_from_config(cfg: DataConfig, seed: int, meta: Metadata | None = None) -> FoldSplit:
    """`make_fold_split` with the values of a `DataConfig` (`seed` is `train.seed`)."""
    return make_fold_split(
        cfg.path,
        cfg.fold,
        validation=cfg.validation,
        validation_speakers=cfg.validation_speakers,
        validation_fraction=cfg.validation_fraction,
        seed=seed,
        meta=meta,
    )
