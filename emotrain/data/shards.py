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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from emotrain.config import LABEL_NAMES

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


def shard_name(index: int, num_shards: int) -> str:
    return f"data-{index:05d}-of-{num_shards:05d}.parquet"


def session_dir(root: str | Path, session: int) -> Path:
    return Path(root) / f"session{session}"


def write_session_shards(
    examples: Iterable[dict[str, Any]], root: str | Path, session: int, num_shards: int
) -> list[Path]:
    """Write one session's examples as `num_shards` Parquet files (round-robin by sorted id).

    Every shard file is written, even an empty one, so shard counts stay what the layout promises.
    `audio` must be `{"bytes": ..., "path": ...}`.
    """
    rows = sorted(examples, key=lambda ex: ex["id"])
    folder = session_dir(root, session)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("data-*.parquet"):
        stale.unlink()
    paths = []
    for index in range(num_shards):
        part = rows[index::num_shards]
        columns = {name: [row[name] for row in part] for name in COLUMNS}
        # Built with pyarrow, not `Dataset.from_dict`: datasets' Audio encoder insists on torchcodec
        # even for ready-made bytes. The schema carries the features in its "huggingface" metadata,
        # so `load_dataset("parquet", ...)` still sees ClassLabel and Audio.
        table = pa.Table.from_pydict(columns, schema=FEATURES.arrow_schema)
        path = folder / shard_name(index, num_shards)
        # An empty shard gets no row group at all: datasets' reader skips such a file, while a
        # zero-row row group makes it fail ("BatchSize must be greater than 0").
        with pq.ParquetWriter(path, table.schema) as writer:
            if table.num_rows:
                writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
        paths.append(path)
    return paths


def session_shard_files(root: str | Path, session: int) -> list[str]:
    """The Parquet files of one prepared session, in shard order."""
    files = sorted(str(p) for p in session_dir(root, session).glob("data-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no prepared shards under {session_dir(root, session)}")
    return files
