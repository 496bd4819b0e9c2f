"""The prepared dataset's schema, its Parquet shard layout and its description (`dataset.json`).

Layout written by `emotrain prepare` (and read by the training stream):

    OUT_DIR/
      session1/data-00000-of-00008.parquet ... data-00007-of-00008.parquet
      ...
      session5/...
      dataset.json          labels, groups (folders), folds, whether there are transcripts and speakers
      prepare_report.json   rows read, kept, skipped (and why), counts per group x class

A group is one folder of shards: a session of IEMOCAP, a session or speaker group of another
corpus, a split (`train/`, `validation/`, `test/`) or a set of utterances EmoBox's fold lists treat
alike. A row's `session` column is its group's number in `dataset.json`. A folder prepared before
`dataset.json` existed is IEMOCAP's: `session1..5`, the 4-class labels, leave-one-session-out.

Each session is split into the same number of shards (`emotrain.config.NUM_SHARDS_PER_GROUP`, 8
by default) so that any fold's four training sessions give 32 shards: a count that divides 1, 2,
4, 8, 16 and 32 ranks, which lets `split_dataset_by_node` hand whole shards to ranks instead of
reading everything on every rank.

Where it lives. `OUT_DIR` (`data.path`) is a local folder or an fsspec URL: `s3://bucket/prefix`,
`gs://...`, `hf://datasets/<user>/<repo>/...` and the like. Everything here goes through fsspec, and
the paths handed to readers are URLs (remote) or plain local paths, so `datasets`, pyarrow and
`emotrain evaluate` read the shards where they are: nothing is copied to local disk. Credentials
and endpoints come from the environment or the filesystem's own configuration (for S3:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_ENDPOINT_URL`, `~/.aws/`, fsspec's
`FSSPEC_S3_*` variables or `~/.config/fsspec/`), never from the URL: a path carrying a password
would land in config.yaml, logs and checkpoints, so `emotrain.config.check_no_credentials`
refuses one.

Whole or refused. A group's shard names say how many it has (`data-00003-of-00008`), each shard's
schema carries the label names it was written with, and `prepare_report.json` counts each group's
rows. Whatever reads the prepared data (`folds.check_prepared` before training, `folds.read_metadata`
for a split or `emotrain evaluate`, the evaluation and training readers) checks what it touches
against them and refuses a missing, truncated or relabelled shard, a copy beside the numbered ones, an
utterance held twice, or a `dataset.json` that is not one, with a one-line `PreparedDataError` naming
the file. One case is a skip instead: a shard damaged after the check, while training reads it (the
file replaced mid-run): the reader logs the error, naming the file, and its remaining rows stand in as
skipped utterances, counted in `train/skipped_utterances` and metrics.json's `skipped_training_utterances`.
Fewer utterances, or swapped class names, are never trained on without a word.
"""

from __future__ import annotations

import json
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emotrain.config import LABEL_NAMES, SAMPLING_RATE, ConfigError

ROW_GROUP_SIZE = 64
"""Rows per Parquet row group (~5 MB of FLAC): the unit the training reader and evaluation read at a time."""

def features(labels: Sequence[str] = LABEL_NAMES) -> datasets.Features:
    """The prepared schema; only the `label` ClassLabel's names depend on the dataset."""
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "session": datasets.Value("int32"),
            "speaker": datasets.Value("string"),
            "dialog": datasets.Value("string"),
            "emotion": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(labels)),
            "text": datasets.Value("string"),
            # Encoded bytes (FLAC or WAV); decoded with soundfile at run time, so no FFmpeg is needed.
            "audio": datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False),
            "duration": datasets.Value("float32"),
            "valence": datasets.Value("float32"),
            "activation": datasets.Value("float32"),
            "dominance": datasets.Value("float32"),
        }
    )


FEATURES = features(LABEL_NAMES)
COLUMNS = tuple(FEATURES)


REPORT_FILE = "prepare_report.json"
"""What `emotrain prepare` kept and skipped, and the counts per session x class (in OUT_DIR)."""

REPREPARE = "re-run `emotrain prepare` to write the prepared dataset again"


class PreparedDataError(ValueError):
    """The prepared dataset at data.path is damaged or incomplete: a shard missing, unreadable or not
    what `dataset.json` / `prepare_report.json` say, or one of those files unreadable. The message is
    one line naming the file (or group folder) and what to do. A ValueError, so that callers which
    refused "not a dataset description" before still refuse it."""


# ---------------------------------------------------------------------------------------------
# Where the prepared data is: a local folder or an fsspec URL.


def filesystem(path: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) of a local path or an fsspec URL. Options (credentials,
    endpoints) come from the environment and fsspec's configuration, as every reader here gets them."""
    return fsspec.core.url_to_fs(str(path))


_STORAGE_CLIENTS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google", "adlfs", "azure", "huggingface_hub",
                    "aiohttp", "fsspec")
"""Packages whose exceptions mean "the storage could not be reached or refused us", not a bug here."""


def storage_error(path: str | Path, err: BaseException, key: str = "data.path") -> ConfigError | None:
    """A one-line ConfigError naming `key` for a failure to reach the storage at `path` (missing or
    rejected credentials, no such bucket, an unreachable endpoint), or None for any other error.
    The message holds the URL and the client's own words, never a credential (URLs carry none)."""
    module = type(err).__module__.split(".")[0]
    if not (isinstance(err, OSError) or module in _STORAGE_CLIENTS):
        return None
    reason = " ".join(f"{type(err).__name__}: {err}".split())
    if not is_url(path):  # a local folder: no credentials or endpoint is involved, only the path itself
        return ConfigError(key, f"cannot use {path} ({reason}): {key} must name a folder this user can access")
    return ConfigError(key, f"cannot reach {path} ({reason}). Credentials and endpoints come from the environment "
                            "or the filesystem's own configuration (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                            "AWS_ENDPOINT_URL, ~/.aws/)")


def is_url(path: str | Path) -> bool:
    """Whether `path` is an fsspec URL (`s3://...`) rather than a local path (`file://` counts as local)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def public_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """What readers are handed for `path` of `fs`: a plain local path, or a URL with its protocol
    (`s3://bucket/...`) that `datasets`, pyarrow and fsspec open wherever they run."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(root: str | Path, *parts: str) -> str:
    """`root/part/...` for a local folder or a URL (pathlib would turn `s3://b` into `s3:/b`)."""
    text = str(root)
    if "://" not in text:
        return str(Path(text, *parts))
    return "/".join([text.rstrip("/"), *parts])


def write_text(url: str, text: str) -> None:
    """Write a small text file to a local path or a URL (its folder created if needed)."""
    fs, path = filesystem(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)  # fsspec paths are '/'-separated
    with fs.open(path, "w") as handle:
        handle.write(text)


def read_prepare_report(root: str | Path) -> dict | None:
    """`prepare_report.json` of a prepared dataset (local or remote); None when there is none.
    Raises PreparedDataError naming the file when it is not JSON."""
    url = join(root, REPORT_FILE)
    fs, path = filesystem(url)
    if not fs.isfile(path):
        return None
    with fs.open(path, "rb") as handle:
        data = handle.read()
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise PreparedDataError(f"{url} is not JSON ({type(err).__name__}: {err}): {REPREPARE}") from None


# ---------------------------------------------------------------------------------------------
# The shards.


def shard_name(index: int, num_shards: int) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}.parquet"


def session_dir(root: str | Path, session: int) -> str:
    return join(root, f"session{session}")


def row_groups_of(parquet: pq.ParquetFile, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(starts [G + 1]: the first row of each row group and the file's row count; [len(rows)] the row
    group holding each of `rows`, G for a row past the end). Reading a row means reading its group."""
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.cumsum([0] + sizes)
    return starts, np.searchsorted(starts, np.asarray(rows, dtype=np.int64), side="right") - 1


SHARD_NAME = re.compile(r"data-(\d{5})-of-(\d{5})\.parquet")
"""`shard_name`'s pattern: a shard's index and how many shards its group has."""
SHARD_NAME_SHAPE = "data-0000k-of-0000n.parquet"


def check_shard_names(folder: str, names: Iterable[str]) -> None:
    """Raise PreparedDataError unless the shards named `data-0000k-of-0000n.parquet` in the group folder
    `folder` are all n of one preparation: a missing shard would silently train on less data, and any
    other `data-*.parquet` beside them (a copy) on duplicates. A folder of other names only (a layout
    made by hand) is not checked."""
    indices: dict[int, set[int]] = {}
    others = []
    for name in names:
        match = SHARD_NAME.fullmatch(name)
        if match:
            indices.setdefault(int(match[2]), set()).add(int(match[1]))
        else:
            others.append(name)
    if indices and others:  # `data-00000-of-00008 (1).parquet`: a copy, read as one more shard of the group
        raise PreparedDataError(f"{join(folder, sorted(others)[0])} was not written by `emotrain prepare` (its shards "
                                f"are named {SHARD_NAME_SHAPE}): remove it or {REPREPARE}")
    if len(indices) > 1:
        counts = ", ".join(f"-of-{n:05d}" for n in sorted(indices))
        raise PreparedDataError(f"{folder} holds shards of {len(indices)} preparations ({counts}): {REPREPARE}")
    for count, present in indices.items():
        missing = [shard_name(i, count) for i in range(count) if i not in present]
        beyond = sorted(i for i in present if i >= count)
        if missing:
            listed = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise PreparedDataError(f"{folder} is missing {listed} (the group has {count} shards): the prepared "
                                    f"dataset is incomplete; {REPREPARE}")
        if beyond:
            raise PreparedDataError(f"{folder} holds {shard_name(beyond[0], count)}, beyond its {count} shards: "
                                    f"{REPREPARE}")


@contextmanager
def reading_shard(url: str) -> Iterator[None]:
    """Turn a failure to read the Parquet shard `url` (truncated, overwritten, removed since it was
    listed) into a one-line PreparedDataError naming it. Storage that refuses us (no permission, no
    credentials) is a ConfigError naming data.path (`storage_error`) instead: re-preparing would not help."""
    try:
        yield
    except PreparedDataError:
        raise
    except Exception as err:
        module = type(err).__module__.split(".")[0]
        refused = isinstance(err, PermissionError) or (
            module in _STORAGE_CLIENTS and not isinstance(err, (OSError, pa.ArrowException)))
        error = storage_error(url, err) if refused else None
        if error is not None:
            raise error from err
        if not isinstance(err, (OSError, EOFError, pa.ArrowException)):
            raise  # not the file: a bug here
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise PreparedDataError(f"cannot read the shard {url} ({reason}): it is damaged or incomplete; "
                                f"{REPREPARE}") from err


def read_shard_footer(url: str) -> pq.FileMetaData:
    """The Parquet footer of one shard (row count, row groups, schema and its metadata): a small read
    at the end of the file, no rows. Raises PreparedDataError for a damaged shard."""
    fs, path = filesystem(url)
    with reading_shard(url), fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata


FOOTER_THREADS = 16
"""Footers read at once: on object storage each is a request or two, and a dataset has hundreds."""


def read_shard_footers(urls: Sequence[str]) -> list[pq.FileMetaData]:
    """`read_shard_footer` of each of `urls`, in parallel threads (every rank checks the whole dataset
    before training: one request after another would be thousands per rank on object storage). The
    error raised for damaged shards is that of the first in `urls`' order, whichever thread ends first."""
    if not urls:
        return []
    with ThreadPoolExecutor(max_workers=min(FOOTER_THREADS, len(urls))) as pool:
        futures = [pool.submit(read_shard_footer, url) for url in urls]
    return [future.result() for future in futures]


def shard_labels(schema_metadata: dict[bytes, bytes] | None) -> tuple[str, ...] | None:
    """The `label` ClassLabel names a shard was written with (its schema's "huggingface" features, see
    `write_session_shards`); None for a shard written without them."""
    try:
        features = json.loads((schema_metadata or {})[b"huggingface"])["info"]["features"]
        return tuple(features["label"]["names"])
    except (KeyError, TypeError, ValueError):
        return None


def write_session_shards(
    examples: Iterable[dict[str, Any]], root: str | Path, session: int, num_shards: int,
    *, folder_name: str | None = None, labels: Sequence[str] = LABEL_NAMES,
) -> list[str]:
    """Write one group's examples as `num_shards` Parquet files (round-robin by sorted id), in
    `root/folder_name` (default `session<session>`), a local folder or an fsspec URL, with `labels`
    as the ClassLabel names; returns their paths (URLs for remote data).

    Every shard file is written, even an empty one, so shard counts stay what the layout promises.
    Shards of an earlier preparation with another shard count are removed first. `audio` must be
    `{"bytes": ..., "path": ...}`.
    """
    rows = sorted(examples, key=lambda ex: ex["id"])
    schema = (FEATURES if tuple(labels) == LABEL_NAMES else features(labels)).arrow_schema
    fs, folder = filesystem(join(root, folder_name) if folder_name else session_dir(root, session))
    fs.makedirs(folder, exist_ok=True)
    stale = fs.glob(f"{folder}/data-*.parquet")
    if stale:
        fs.rm(stale)
    paths = []
    for index in range(num_shards):
        part = rows[index::num_shards]
        columns = {name: [row[name] for row in part] for name in COLUMNS}
        # Built with pyarrow, not `Dataset.from_dict`: datasets' Audio encoder insists on torchcodec
        # even for ready-made bytes. The schema carries the features in its "huggingface" metadata,
        # so `load_dataset("parquet", ...)` still sees ClassLabel and Audio.
        table = pa.Table.from_pydict(columns, schema=schema)
        path = f"{folder}/{shard_name(index, num_shards)}"
        # An empty shard gets no row group at all: datasets' reader skips such a file, while a
        # zero-row row group makes it fail ("BatchSize must be greater than 0").
        # Written through an fsspec file object: on object storage it is one upload per shard.
        with fs.open(path, "wb") as handle, pq.ParquetWriter(handle, table.schema) as writer:
            if table.num_rows:
                writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        paths.append(public_path(fs, path))
    return paths


def list_shard_files(path: str, folder: str) -> list[str]:
    """The Parquet shards of one group folder of the prepared dataset at `path` (a local folder or
    an fsspec URL), sorted, as paths/URLs that `datasets` and fsspec open; [] when there are none."""
    fs, root = filesystem(path)
    found = sorted(fs.glob(f"{root.rstrip('/')}/{folder}/data-*.parquet"))
    check_shard_names(join(path, folder), (posixpath.basename(p) for p in found))
    return [public_path(fs, p) for p in found]


# ---------------------------------------------------------------------------------------------
# dataset.json: what training, evaluation and the report read about the data, besides the rows.

DATASET_FILE = "dataset.json"
FOLD_KINDS = ("sessions", "groups", "split", "emobox")


@dataclass(frozen=True)
class FoldSpec:
    """One fold: which groups (by number) train, validate and test. No validation groups: the
    validation set is held out of the training groups (`data.validation`)."""

    number: int
    train: tuple[int, ...]
    test: tuple[int, ...]
    validation: tuple[int, ...] = ()


@dataclass(frozen=True)
class DatasetInfo:
    """A prepared dataset's description (`dataset.json`)."""

    labels: tuple[str, ...]
    groups: dict[str, int]
    """Folder name → group number (the rows' `session` column)."""
    folds: tuple[FoldSpec, ...]
    fold_kind: str
    """How the folds were made: `sessions` (leave-one-session-out), `groups` (leave-one-group-out),
    `split` (a predefined train/validation/test split: one fold), `emobox` (EmoBox's fold lists)."""
    has_text: bool = True
    has_speakers: bool = True
    source: str = ""
    notes: tuple[str, ...] = field(default=())
    """What a user must know about this data (no speakers: how validation is drawn; no text: why)."""
    codes_per_label: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Label → the source's own emotion codes among the kept rows (`happy`: `exc`, `hap` where the
    data merged excited into happy); empty where unknown (prepared before it was recorded)."""

    def folder(self, group: int) -> str:
        return next(name for name, number in self.groups.items() if number == group)

    def fold(self, number: int) -> FoldSpec:
        """Fold `number`; 0 trains on every group except validation ones, with no test."""
        if number == 0:
            validation = tuple(sorted({g for spec in self.folds for g in spec.validation}))
            return FoldSpec(0, tuple(g for g in sorted(self.groups.values()) if g not in validation), (), validation)
        for spec in self.folds:
            if spec.number == number:
                return spec
        raise KeyError(number)

    def fold_numbers(self) -> list[int]:
        return [spec.number for spec in self.folds]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"], data["notes"] = list(self.labels), list(self.notes)
        data["codes_per_label"] = {label: list(codes) for label, codes in self.codes_per_label.items()}
        data["folds"] = [{**asdict(spec), "train": list(spec.train), "test": list(spec.test),
                          "validation": list(spec.validation)} for spec in self.folds]
        return {"format": 1, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetInfo:
        folds = tuple(FoldSpec(int(f["number"]), tuple(f["train"]), tuple(f["test"]), tuple(f.get("validation", ())))
                      for f in data["folds"])
        return cls(labels=tuple(data["labels"]), groups={str(k): int(v) for k, v in data["groups"].items()},
                   folds=folds, fold_kind=data["fold_kind"], has_text=bool(data.get("has_text", True)),
                   has_speakers=bool(data.get("has_speakers", True)), source=str(data.get("source", "")),
                   notes=tuple(data.get("notes", ())),
                   codes_per_label={str(k): tuple(map(str, v)) for k, v in data.get("codes_per_label", {}).items()})


def leave_one_out_folds(groups: Sequence[int]) -> tuple[FoldSpec, ...]:
    """Fold g tests on group g and trains on the others (IEMOCAP's leave-one-session-out)."""
    return tuple(FoldSpec(g, tuple(o for o in groups if o != g), (g,)) for g in groups)


IEMOCAP_INFO = DatasetInfo(labels=LABEL_NAMES, groups={f"session{s}": s for s in range(1, 6)},
                           folds=leave_one_out_folds(range(1, 6)), fold_kind="sessions", source="IEMOCAP release")
"""What a prepared folder without `dataset.json` is (prepared before it existed, or by hand)."""


def write_dataset_info(out_dir: str | Path, info: DatasetInfo) -> str:
    path = join(out_dir, DATASET_FILE)
    write_text(path, json.dumps(info.to_json(), indent=2) + "\n")
    return path


def read_dataset_info(path: str) -> DatasetInfo:
    """The description of the prepared dataset at `path` (local or fsspec URL); IEMOCAP_INFO when
    it has no `dataset.json`."""
    url = join(path, DATASET_FILE)
    fs, file = filesystem(url)
    # Opened, not `fs.isfile`-tested first: isfile answers False for any error (access denied, a
    # timeout), and only a file that is not there means IEMOCAP; anything else is raised.
    try:
        with fs.open(file, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return IEMOCAP_INFO
    except Exception as err:  # no credentials, access denied, endpoint down: one line naming data.path
        error = storage_error(path, err)
        if error is None:
            raise
        raise error from err
    try:  # not JSON, or JSON of another shape: either way the file names itself
        return DatasetInfo.from_json(json.loads(raw.decode("utf-8")))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise PreparedDataError(f"{url} is not a dataset description ({reason}): {REPREPARE}") from None
