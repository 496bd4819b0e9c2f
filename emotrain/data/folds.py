"""Folds over a prepared dataset, computed from light columns only.

    split = make_fold_split("runs/synthetic/prepared", fold=3, validation="speakers",
                            validation_speakers=1, seed=42)
    split.train_files        # the Parquet shards of sessions 1, 2, 4, 5
    split.validation_ids     # held out of those four sessions (whole speakers, drawn by seed)
    split.test_ids           # every utterance of session 3 (None when fold=0)

The folds are the prepared dataset's own (`dataset.json`, see `emotrain.data.shards`): IEMOCAP's
fold k in 1..5 tests on session k and trains on the other four; a corpus with G sessions or speaker
groups has G such folds; a predefined train/validation/test split is one fold; EmoBox's fold lists
keep their numbers. Validation comes from a fold's validation groups when it has them, else it is
drawn from its training groups only (model selection on the test groups inflates results): whole
speakers, or a random fraction (always a fraction for data without speakers). Fold 0 has no test
split: every group trains, minus validation. Only `id, session, speaker, label, duration` are read
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

from emotrain.config import ConfigError, DataConfig, ModelConfig
from emotrain.data.shards import (
    DATASET_FILE,
    REPREPARE,
    REPORT_FILE,
    DatasetInfo,
    FoldSpec,
    PreparedDataError,
    join,
    list_shard_files,
    read_dataset_info,
    read_prepare_report,
    read_shard_footers,
    reading_shard,
    shard_labels,
    storage_error,
)

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
    """The test group when there is exactly one (IEMOCAP: the test session), else None."""
    test_ids: tuple[str, ...] | None
    meta: Metadata = field(repr=False, compare=False)
    test_sessions: tuple[int, ...] = ()
    validation_sessions: tuple[int, ...] = ()
    """Groups that are the fold's validation set (a predefined validation split); empty: held out
    of the training groups."""
    label_names: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    """How this split departs from what was asked (validation by fraction for data without speakers)."""

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
            "test_sessions": list(self.test_sessions),
            "validation_sessions": list(self.validation_sessions),
            "num_train_files": len(self.train_files),
            "num_train": int(train.sum()),
            "num_validation": self.num_validation,
            "num_test": self.num_test,
            "validation_speakers": list(self.validation_speakers),
            "train_label_counts": {
                name: int((self.meta.label[train] == i).sum()) for i, name in enumerate(self.label_names)
            },
            "train_hours": float(self.meta.duration[train].sum() / 3600.0),
            "fingerprint": self.fingerprint(),
        } | ({"notes": list(self.notes)} if self.notes else {})


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


def list_session_files(path: str, session: int, info: DatasetInfo | None = None) -> list[str]:
    """The Parquet shards of one prepared group (an IEMOCAP session), sorted, as paths/URLs
    `datasets` and fsspec open."""
    try:
        info = info if info is not None else read_dataset_info(path)
        try:
            folder = info.folder(session)
        except StopIteration:
            raise NoPreparedDataset(path, session) from None
        found = list_shard_files(path, folder)
        if not found:
            # dataset.json is written after every group's shards: with it, a group folder was lost since.
            fs, described = fsspec.core.url_to_fs(join(path, DATASET_FILE))
            if fs.exists(described):
                raise PreparedDataError(f"{join(path, folder)} holds no shards, but {join(path, DATASET_FILE)} lists "
                                        f"the group {folder}: the prepared dataset is incomplete (a group folder was "
                                        f"removed or not copied); {REPREPARE}")
            # Nothing prepared at all is the common mistake (train before prepare): say that.
            anything = any(list_shard_files(path, name) for name in info.groups)
            raise NoPreparedDataset(path, session if anything else None)
    except (NoPreparedDataset, PreparedDataError):
        raise
    except Exception as err:  # no credentials, access denied, no such bucket, endpoint down: one line
        error = storage_error(path, err)
        if error is None:
            raise
        raise error from err
    return found


def read_parquet(url: str, columns: list[str] | tuple[str, ...]):
    """Read some columns of one Parquet file through fsspec (local or remote)."""
    fs, path = fsspec.core.url_to_fs(url)
    with reading_shard(url), fs.open(path, "rb") as handle:
        # Without Arrow's thread pools (decoding, and pre-buffering on its I/O pool): reading a Python file
        # object through them, a process that exits soon after sometimes aborts ("terminate called without
        # an active exception": 1 run in 10 under load, e.g. `emotrain cv` refusing a finished run after
        # reading the new data's metadata; 0 in 80 without). A few light columns: threads buy nothing.
        return pq.read_table(handle, columns=list(columns), use_threads=False, pre_buffer=False)


def check_prepared(path: str) -> DatasetInfo:
    """Return the description of the prepared dataset at `path` once it is known whole: raise
    NoPreparedDataset unless every group has shards, and PreparedDataError (one line naming the file)
    for a missing, damaged or relabelled shard or a group whose row count is not the one prepared
    (`check_shards`). Reads `dataset.json`, `prepare_report.json` and each shard's footer, no rows."""
    info = read_dataset_info(path)
    files = {session: list_session_files(path, session, info) for session in info.groups.values()}
    urls = [url for group in files.values() for url in group]  # by group, then file name: the first error is the same
    footers = dict(zip(urls, read_shard_footers(urls)))
    rows: dict[int, int] = {}
    for session, group in files.items():
        rows[session] = sum(footers[url].num_rows for url in group)
        for url in group:
            check_shard_labels(path, info, url, footers[url].schema.to_arrow_schema().metadata)
    check_group_rows(path, info, rows)
    return info


def check_shard_labels(path: str, info: DatasetInfo, url: str, schema_metadata: dict | None) -> None:
    """A shard's label names (written into its schema by `emotrain prepare`) must be `dataset.json`'s,
    in its order: an edited order would train and report every class under another's name."""
    written = shard_labels(schema_metadata)
    if written is not None and written != tuple(info.labels):
        raise PreparedDataError(f"{join(path, DATASET_FILE)} lists the labels {list(info.labels)}, but {url} was "
                                f"prepared with {list(written)} (in that order): dataset.json was edited or belongs "
                                f"to another preparation; restore it or {REPREPARE}")


def check_group_rows(path: str, info: DatasetInfo, rows: dict[int, int]) -> None:
    """Each group's rows in its shards (`rows`: group → count) must be what `prepare_report.json`
    counted when they were written; a dataset without a report (prepared by hand) is not checked."""
    counts = (read_prepare_report(path) or {}).get("counts")
    if not isinstance(counts, dict):
        return
    for group, found in rows.items():
        folder = info.folder(group)
        entry = counts.get(folder)
        expected = entry.get("total") if isinstance(entry, dict) else None
        if isinstance(expected, int) and expected != found:
            raise PreparedDataError(f"{join(path, folder)} holds {found} rows in its shards, but "
                                    f"{join(path, REPORT_FILE)} counted {expected} when they were written: "
                                    f"a shard was replaced or lost; {REPREPARE}")


def check_config_fits_dataset(data: DataConfig, model: ModelConfig, info: DatasetInfo) -> None:
    """Refuse, before any training, a config the prepared data cannot serve: a variant that needs
    transcripts the data lacks, or pinned labels (`data.labels`) that are not the data's."""
    fold_spec(info, data.fold, data.path)
    if model.variant in ("fusion", "text") and not info.has_text:
        why = next((note for note in info.notes if "transcript" in note), "it was prepared without transcripts")
        raise ConfigError("model.variant", f"{model.variant} needs transcripts, and the prepared dataset at "
                          f"{data.path} has none ({why}): train model.variant=audio")
    check_pinned_labels(data, info)


def fold_spec(info: DatasetInfo, fold: int, path: str) -> FoldSpec:
    """Fold `fold` of the dataset, or a ConfigError naming data.fold and the folds there are."""
    try:
        return info.fold(fold)
    except KeyError:
        raise ConfigError("data.fold", f"is {fold}, but the prepared dataset at {path} has folds "
                          f"{info.fold_numbers()} ({info.fold_kind}; 0 trains on everything)") from None


def check_pinned_labels(data: DataConfig, info: DatasetInfo) -> None:
    """`data.labels`, when given, must be the dataset's names in its order (the model's outputs)."""
    if data.labels is not None and tuple(data.labels) != tuple(info.labels):
        raise ConfigError("data.labels", f"pins {list(data.labels)}, but the prepared dataset at {data.path} has "
                          f"{list(info.labels)} (in that order): remove data.labels or prepare the data with those")


def read_metadata(path: str, sessions: tuple[int, ...] | None = None, info: DatasetInfo | None = None) -> Metadata:
    """Read the light columns of the given groups' shards (default: every group; no audio).

    Raises NoPreparedDataset (a ConfigError and a FileNotFoundError) when `path` holds none, and
    PreparedDataError for a missing, damaged or relabelled shard or a group short of rows (the checks
    of `check_prepared`, on what is read here anyway) or an utterance id held twice.
    """
    info = info if info is not None else read_dataset_info(path)
    sessions = tuple(sorted(info.groups.values())) if sessions is None else sessions
    files: list[str] = []
    file_session: list[int] = []
    parts: dict[str, list] = {name: [] for name in META_COLUMNS + ("file", "row")}
    rows: dict[int, int] = {}
    for session in sessions:
        for url in list_session_files(path, session, info):
            table = read_parquet(url, META_COLUMNS)
            check_shard_labels(path, info, url, table.schema.metadata)
            n = table.num_rows
            rows[session] = rows.get(session, 0) + n
            for name in META_COLUMNS:
                parts[name].extend(table.column(name).to_pylist())
            parts["file"].extend([len(files)] * n)
            parts["row"].extend(range(n))
            files.append(url)
            file_session.append(session)
    check_group_rows(path, info, rows)
    meta = Metadata(
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
    check_unique_ids(path, meta)  # every reader (a fold split, evaluate) needs each id once
    return meta


def check_unique_ids(path: str, meta: Metadata) -> None:
    """Raise PreparedDataError naming the shards that hold the same utterance id: a shard copied in by
    hand (or two preparations mixed) would train on those rows twice, or test on training rows."""
    ids, counts = np.unique(meta.id.astype(str), return_counts=True)
    if counts.max(initial=1) == 1:
        return
    repeated = ids[counts > 1]
    holders = sorted({meta.files[f] for f in meta.file[meta.id == repeated[0]]})
    raise PreparedDataError(f"{len(repeated)} utterance id(s) appear more than once in the prepared dataset at {path} "
                            f"({str(repeated[0])!r} in {' and '.join(holders)}): a shard was copied or two preparations "
                            f"mixed; remove the copy or {REPREPARE}")


def make_fold_split(
    path: str,
    fold: int,
    validation: Literal["speakers", "fraction"] = "speakers",
    validation_speakers: int = 1,
    validation_fraction: float = 0.1,
    seed: int = 42,
    meta: Metadata | None = None,
    info: DatasetInfo | None = None,
) -> FoldSplit:
    """Compute fold `fold`'s split of the prepared dataset at `path` (see the module docstring).

    The validation draw depends on (seed, fold) only, never on file order or the machine.
    """
    info = info if info is not None else read_dataset_info(path)
    spec = fold_spec(info, fold, path)
    meta = meta if meta is not None else read_metadata(path, info=info)
    check_unique_ids(path, meta)  # (a `meta` given by the caller too)
    train_sessions, test_sessions = spec.train, spec.test
    in_train = np.isin(meta.session, train_sessions)
    # Every shard of a training group, empty ones included: shard counts decide rank sharding.
    train_files = tuple(f for f, s in zip(meta.files, meta.file_session) if s in train_sessions)

    rng = np.random.default_rng([seed, fold, 0x5E1EC7])
    held_speakers: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    if validation == "speakers" and not info.has_speakers and not spec.validation:
        # Nothing says which utterances share a voice: hold out utterances, and say so.
        notes = (f"the data has no speakers: validation is a random {validation_fraction:.0%} of the training "
                 "utterances (data.validation_fraction), so it may share speakers with training",)
        validation = "fraction"
    if spec.validation:
        validation = "split"
        validation_ids = tuple(sorted(meta.id[np.isin(meta.session, spec.validation)].tolist()))
    elif validation == "speakers":
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
    if test_sessions:
        test_ids = tuple(sorted(meta.id[np.isin(meta.session, test_sessions)].tolist()))
    return FoldSplit(
        fold=fold,
        seed=seed,
        validation_mode=validation,
        train_sessions=train_sessions,
        train_files=train_files,
        validation_ids=validation_ids,
        validation_speakers=held_speakers,
        test_session=test_sessions[0] if len(test_sessions) == 1 else None,
        test_ids=test_ids,
        meta=meta,
        test_sessions=test_sessions,
        validation_sessions=spec.validation,
        label_names=info.labels,
        notes=notes,
    )


def split_from_config(cfg: DataConfig, seed: int, meta: Metadata | None = None) -> FoldSplit:
    """`make_fold_split` with the values of a `DataConfig` (`seed` is `train.seed`)."""
    info = read_dataset_info(cfg.path)
    check_pinned_labels(cfg, info)
    return make_fold_split(
        cfg.path,
        cfg.fold,
        validation=cfg.validation,
        validation_speakers=cfg.validation_speakers,
        validation_fraction=cfg.validation_fraction,
        seed=seed,
        meta=meta,
        info=info,
    )
