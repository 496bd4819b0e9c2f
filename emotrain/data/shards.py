"""The prepared dataset's schema and its Parquet shard layout.

Layout written by `emotrain prepare` (and read by the training stream):

    OUT_DIR/
      session1/data-00000-of-00008.parquet ... data-00007-of-00008.parquet
      ...
      session5/...
      prepare_report.json

Each session is split into the same number of shards (8 by default) so that any fold's four
training sessions give 32 shards: a count that divides 1, 2, 4, 8, 16 and 32 ranks, which lets
`split_dataset_by_node` hand whole shards to ranks instead of reading everything on every rank.

Where it lives. `OUT_DIR` (`data.path`) is a local folder or an fsspec URL: `s3://bucket/prefix`,
`gs://...`, `hf://datasets/<user>/<repo>/...` and the like. Everything here goes through fsspec, and
the paths handed to readers are URLs (remote) or plain local paths, so `datasets`, pyarrow and
`emotrain evaluate` read the shards where they are: nothing is copied to local disk. Credentials
and endpoints come from the environment or the filesystem's own configuration (for S3:
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_ENDPOINT_URL`, `~/.aws/`, fsspec's
`FSSPEC_S3_*` variables or `~/.config/fsspec/`), never from the URL: a path carrying a password
would land in config.yaml, logs and checkpoints, so `emotrain.config.check_no_credentials`
refuses one.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any, Iterable

import datasets
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from emotrain.config import LABEL_NAMES, ConfigError

SAMPLING_RATE = 16_000
ROW_GROUP_SIZE = 64
"""Rows per Parquet row group (~5 MB of FLAC): the unit datasets reads at a time."""

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "session": datasets.Value("int32"),
        "speaker": datasets.Value("string"),
        "dialog": datasets.Value("string"),
        "emotion": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(LABEL_NAMES)),
        "text": datasets.Value("string"),
        # Encoded bytes (FLAC or WAV); decoded with soundfile at run time, so no FFmpeg is needed.
        "audio": datasets.Audio(sampling_rate=SAMPLING_RATE, decode=False),
        "duration": datasets.Value("float32"),
        "valence": datasets.Value("float32"),
        "activation": datasets.Value("float32"),
        "dominance": datasets.Value("float32"),
    }
)
COLUMNS = tuple(FEATURES)


REPORT_FILE = "prepare_report.json"
"""What `emotrain prepare` kept and skipped, and the counts per session x class (in OUT_DIR)."""


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
    return ConfigError(key, f"cannot reach {path} ({reason}). Credentials and endpoints come from the environment "
                            "or the filesystem's own configuration (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                            "AWS_ENDPOINT_URL, ~/.aws/)")


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
    """`prepare_report.json` of a prepared dataset (local or remote); None when there is none."""
    fs, path = filesystem(join(root, REPORT_FILE))
    if not fs.isfile(path):
        return None
    with fs.open(path, "r") as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------
# The shards.


def shard_name(index: int, num_shards: int) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}.parquet"


def session_dir(root: str | Path, session: int) -> str:
    return join(root, f"session{session}")


def write_session_shards(
    examples: Iterable[dict[str, Any]], root: str | Path, session: int, num_shards: int
) -> list[str]:
    """Write one session's examples as `num_shards` Parquet files (round-robin by sorted id), to a
    local folder or an fsspec URL; returns their paths (URLs for remote data).

    Every shard file is written, even an empty one, so shard counts stay what the layout promises.
    Shards of an earlier preparation with another shard count are removed first. `audio` must be
    `{"bytes": ..., "path": ...}`.
    """
    rows = sorted(examples, key=lambda ex: ex["id"])
    fs, folder = filesystem(session_dir(root, session))
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
        table = pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema)
        path = f"{folder}/{shard_name(index, num_shards)}"
        # An empty shard gets no row group at all: datasets' reader skips such a file, while a
        # zero-row row group makes it fail ("BatchSize must be greater than 0").
        # Written through an fsspec file object: on object storage it is one upload per shard.
        with fs.open(path, "wb") as handle, pq.ParquetWriter(handle, table.schema) as writer:
            if table.num_rows:
                writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        paths.append(public_path(fs, path))
    return paths


def session_shard_files(root: str | Path, session: int) -> list[str]:
    """The Parquet files of one prepared session, in shard order (local paths or URLs)."""
    fs, folder = filesystem(session_dir(root, session))
    files = sorted(fs.glob(f"{folder}/data-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no prepared shards under {session_dir(root, session)}")
    return [public_path(fs, f) for f in files]
