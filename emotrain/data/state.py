"""The training stream's resume state: what a rank saves, and what a saved state must agree on.

A rank's state is `{epoch, position}` (batches of the epoch already yielded) plus what the plan
depends on: world size, accumulation, and fingerprints of the split, of the shard layout (files
and the ids in each, in row order), of the labels and of the plan settings. It also records the
number of data workers, which shapes no batch: a resume with another count goes on exactly. It is
small and JSON (one file per rank in every checkpoint). Anything that shaped the plan and changed
since is an error naming it: re-prepared shards would otherwise silently repeat some utterances and
skip others.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import MISSING, fields
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from emotrain.data.folds import FoldSplit, Metadata
from emotrain.data.plan import StreamSettings

STATE_FORMAT = "emotrain.train_stream/3"
"""/3: the rank's plan no longer depends on the number of data workers."""
WORKER_PLANS_FORMAT = "emotrain.train_stream/2"
"""States of the versions where each data worker planned shards of its own: with 0 or 1 worker
that plan is the rank's plan now (the same seed), so they resume; with more, it cannot be replayed."""


def layout_fingerprint(meta: Metadata) -> dict[str, Any]:
    """The shard layout: which files (by their name inside the dataset folder, so a moved or
    remote copy still matches) hold which ids in which row order, and their durations (the plan
    buckets by duration: re-encoded or trimmed audio would plan other batches)."""
    names = [str(PurePosixPath(*PurePosixPath(str(url).replace("\\", "/")).parts[-2:])) for url in meta.files]
    rows = [meta.id[meta.file == f].tolist() for f in range(len(meta.files))]
    durations = np.round(meta.duration, 4).tolist()
    return {"files": len(names), "names": _digest(names), "rows": _digest(rows), "durations": _digest(durations)}


def labels_fingerprint(label_names: tuple[str, ...] | list[str], meta: Metadata) -> dict[str, Any]:
    """The label set (names, in order) and every row's label: data re-prepared with the same rows
    but other labels (another order, a renamed class) would train on permuted classes."""
    return {"names": list(label_names), "rows": _digest(np.asarray(meta.label).tolist())}


DATA_FINGERPRINT_KEYS = ("split", "layout", "labels")
"""What `data_fingerprint` holds; a stream state holds the same keys (see `TrainStream.identity`)."""


def data_fingerprint(split: FoldSplit) -> dict[str, Any]:
    """What a run trained on, whatever the data's path: which ids train, validate and test (`split`),
    the shard layout (`layout_fingerprint`) and the labels (`labels_fingerprint`). Small and JSON."""
    return {"split": split.fingerprint(), "layout": layout_fingerprint(split.meta),
            "labels": labels_fingerprint(split.label_names, split.meta)}


def data_difference(saved: dict[str, Any], mine: dict[str, Any]) -> str | None:
    """How two `data_fingerprint`s differ, in words (None when they are the same data)."""
    old_layout, new_layout = saved.get("layout") or {}, mine.get("layout") or {}
    if old_layout.get("names") != new_layout.get("names"):
        return f"{old_layout.get('files')} shard files then, {new_layout.get('files')} now, under other names"
    if old_layout.get("rows") != new_layout.get("rows"):
        return "the same files hold other rows (or rows in another order)"
    if old_layout.get("durations") != new_layout.get("durations"):
        return "the same rows have other durations (re-encoded or trimmed audio)"
    old_labels, new_labels = saved.get("labels") or {}, mine.get("labels") or {}
    if old_labels != new_labels:
        if old_labels.get("names") != new_labels.get("names"):
            return f"the label set was {old_labels.get('names')}, now {new_labels.get('names')}"
        return "the same rows have other labels"
    if saved.get("split") != mine.get("split"):
        return "another split (which utterances train, validate and test)"
    return None


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, separators=(",", ":")).encode(), digest_size=8).hexdigest()


def encode_mask(mask: np.ndarray | None) -> str | None:
    return None if mask is None else base64.b64encode(np.packbits(mask).tobytes()).decode()


def decode_mask(text: str | None, length: int) -> np.ndarray | None:
    if text is None:
        return None
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(bits) < length:
        raise ValueError("stream state: the consumed-rows mask is shorter than the dataset")
    return bits[:length].astype(bool)


def check_states(states: list[dict[str, Any]]) -> None:
    """Every rank's state, ordered by rank, of this format, taken at the same batch."""
    if not states:
        raise ValueError("no stream state to resume from")
    for rank, state in enumerate(states):
        if state.get("format") == WORKER_PLANS_FORMAT and int(state.get("num_workers", 0)) > 1:
            raise ValueError(
                f"stream state of rank {rank} was written by an emotrain version whose batches depended on "
                f"data.num_workers ({state['num_workers']} then): epoch {state.get('epoch')} cannot be resumed "
                "exactly. Start a new run in another output_dir"
            )
        if state.get("format") not in (STATE_FORMAT, WORKER_PLANS_FORMAT):
            raise ValueError(
                f"stream state of rank {rank} has format {state.get('format')!r}, expected {STATE_FORMAT!r} "
                "(written by another emotrain version): start a new run in another output_dir"
            )
        if state.get("rank") != rank or state.get("world_size") != len(states):
            raise ValueError(f"stream states are not one per rank 0..{len(states) - 1} (rank {rank}: {state})")
    if len({(s["epoch"], s["position"]) for s in states}) != 1:
        raise ValueError("the checkpoint's ranks stopped at different batches: it was not taken at a step boundary")


def check_identity(saved: dict[str, Any], mine: dict[str, Any]) -> None:
    """A saved state's split, shard layout and plan settings must be this stream's."""
    if saved.get("split") != mine["split"]:
        raise ValueError(
            "the fold's split (which utterances train, validate and test) differs from the checkpoint's: "
            "data.fold, the validation settings, train.seed or the prepared data changed"
        )
    old, new = saved.get("layout") or {}, mine["layout"]
    if old != new:
        if old.get("names") != new["names"]:
            what = f"{old.get('files')} shard files then, {new['files']} now"
        elif old.get("rows") != new["rows"]:
            what = "the same files hold other rows (or rows in another order)"
        else:
            what = "the same rows have other durations (re-encoded or trimmed audio)"
        raise ValueError(
            f"the prepared data was re-written since the checkpoint ({what}): the rest of epoch "
            f"{saved.get('epoch')} cannot be resumed exactly (some utterances would repeat, others be "
            "skipped). Resume on the data the checkpoint was trained on, or start a new run in another output_dir"
        )
    # Labels: absent from states saved before label sets came from the data (IEMOCAP's then).
    if "labels" in saved and saved["labels"] != mine["labels"]:
        old_names, new_names = saved["labels"].get("names"), mine["labels"]["names"]
        what = (f"the label set was {old_names}, now {new_names}" if old_names != new_names
                else "the same rows have other labels")
        raise ValueError(f"the prepared data was re-labelled since the checkpoint ({what}): resuming would train on "
                         "other classes. Resume on the data the checkpoint was trained on, or start a new run")
    old_settings = saved.get("settings") or {}
    # A setting added since the checkpoint was written counts as its default (which plans as before).
    defaults = {f.name: f.default for f in fields(StreamSettings) if f.default is not MISSING}
    changed = [f"{_config_key(key)} {old_settings.get(key, defaults.get(key))!r} -> {value!r}"
               for key, value in mine["settings"].items() if old_settings.get(key, defaults.get(key)) != value]
    if changed:
        raise ValueError(f"the batch plan's settings differ from the checkpoint's: {', '.join(changed)}")


def _config_key(setting: str) -> str:
    """The config key behind a `StreamSettings` field (for error messages)."""
    return {"seed": "train.seed", "batch_size": "train.batch_size"}.get(setting, f"data.{setting}")
