"""Read the history of an offline W&B run from its `run-<id>.wandb` file (tests only).

The file is `:W&B` + a 3-byte magic/version header followed by LevelDB-log-format records (32 KiB
blocks, 7-byte record headers: crc32, length, type), each a `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    return [wandb_internal_pb2.Record.FromString(raw) for raw in records]


def run_history(run_dir: str | Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of one offline run folder."""
    (log_file,) = Path(run_dir).glob("run-*.wandb")
    run_id, rows = log_file.stem[len("run-"):], []
    for record in read_records(log_file):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return run_id, rows
