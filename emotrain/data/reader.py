"""The reader: reads one rank's planned batches from the Parquet shards and decodes them.

Runs in DataLoader workers (or in the training process with `num_workers=0`). The rank's plan is
one sequence of batches (`emotrain.data.plan`, the same whatever the worker count); the workers
only share out its decoding: at a pass starting at batch `start`, worker k of n decodes the batches
at positions start + k, start + k + n, ..., the order in which torch's DataLoader asks its workers
(worker 0 first at every pass), so the batches arrive in plan order. Each worker goes through the
rank's shards in the plan's read order and reads, with pyarrow through fsspec, only the row groups
holding rows of its own batches, one row group at a time; it keeps those rows until their batch is
complete (a bounded window: batches follow the read order through the plan's shuffle and bucket
buffers), then decodes it (soundfile, soxr), crops it (seeded by (seed, epoch, id)), tokenises and
collates it. Every worker thus reads most of the rank's compressed audio but decodes only its share.

The workers are persistent: they are started once and read, at the start of every pass, which
epoch and from which batch the pass covers (`PassControl`, shared memory the main process writes
before each `iter(loader)`), and plan that epoch themselves (`plan_epoch` is a pure function of
metadata: the same plan the main process computes). So an epoch or a resume costs no process start.

Bad data never changes the batch structure: an utterance whose audio cannot be decoded (or whose
shard cannot be read) stands in as a 0.1 s silence with `valid == False` in its batch (the loss
leaves it out), is logged with its id and reported with the batch; the epoch goes on.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
import fsspec.asyn
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from emotrain.data.audio import AudioDecodeError, crop, crop_offset, decode_audio
from emotrain.data.plan import EpochPlan, plan_epoch
from emotrain.data.shards import PreparedDataError, reading_shard, row_groups_of

if TYPE_CHECKING:
    from emotrain.data.batching import Collator
    from emotrain.data.folds import FoldSplit
    from emotrain.data.plan import StreamSettings

logger = logging.getLogger("emotrain.data")

READ_COLUMNS = ["id", "label", "text", "audio"]
STAND_IN_SECONDS = 0.1
"""A training utterance that cannot be decoded stands in as this much silence, with valid=False."""
PREFETCH_BATCHES = 4
"""Batches each worker keeps ready (DataLoader's prefetch_factor): dynamic batches vary in cost."""

_FAILED = object()  # a row whose shard could not be read


class StreamMismatchError(PreparedDataError):
    """The Parquet shards no longer hold what the metadata (and so the plan) says."""


FAILED_POSITION = -1
"""The position of an item that carries a worker's PreparedDataError instead of a batch (see `EpochReader`)."""


class PassControl:
    """What the reader's next pass covers: (epoch, first batch, rows already trained on in the
    epoch before its plan began). Shared memory: the main process sets it before each pass, and
    every persistent worker reads it when its pass starts."""

    def __init__(self, num_rows: int, context: str | None = None):
        ctx = multiprocessing.get_context(context)
        self._head = ctx.Array("q", 3, lock=False)  # epoch, start, 1 if an exclude mask is set
        self._exclude = ctx.Array("b", max(num_rows, 1), lock=False)
        self._num_rows = num_rows

    def set(self, epoch: int, start: int, exclude: np.ndarray | None) -> None:
        if exclude is not None:
            np.frombuffer(self._exclude, dtype=np.int8)[: self._num_rows] = exclude
        self._head[:] = [epoch, start, int(exclude is not None)]

    def get(self) -> tuple[int, int, np.ndarray | None]:
        epoch, start, has_exclude = self._head[:]
        exclude = np.frombuffer(self._exclude, dtype=np.int8)[: self._num_rows].astype(bool) if has_exclude else None
        return int(epoch), int(start), exclude


class EpochReader(IterableDataset):
    """Yields `(position, batch, skipped ids)` for the batches of the pass `control` describes."""

    def __init__(
        self,
        split: "FoldSplit",
        settings: "StreamSettings",
        collator: "Collator",
        *,
        rank: int,
        world_size: int,
        accumulation: int,
        control: PassControl,
    ):
        super().__init__()
        self.split = split
        self.settings = settings
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.accumulation = accumulation
        self.control = control

    def __iter__(self):
        epoch, start, exclude = self.control.get()
        plan = plan_epoch(self.split, self.settings, self.world_size, epoch=epoch, accumulation=self.accumulation,
                          exclude=exclude)[self.rank]
        info = get_worker_info()
        if info is None:  # in-process (num_workers=0): every batch
            yield from self._produce(plan, range(start, len(plan)))
            return
        # A forked worker must not reuse the parent's fsspec event-loop lock (remote filesystems
        # hang otherwise).
        fsspec.asyn.reset_lock()
        # The DataLoader asks worker 0 first at every pass, then 1, ...: round robin from `start`.
        try:
            yield from self._produce(plan, range(start + info.id, len(plan), info.num_workers))
        except PreparedDataError as err:
            # Raised here, torch would hand the main process a copy whose message is this worker's
            # traceback; sent as an item, it reaches the user as the one line it is (the stream raises it).
            yield FAILED_POSITION, err, []

    def _produce(self, plan: EpochPlan, positions: range):
        """Yields the batches of `plan` at `positions`, in that order, reading only their rows."""
        batches = [plan.batch(p) for p in positions]
        if not batches:
            return
        meta = self.split.meta
        missing = np.array([len(b) for b in batches], dtype=np.int64)
        batch_of: dict[int, int] = {}
        for j, b in enumerate(batches):
            for m in b.tolist():
                batch_of[m] = j
        held: dict[int, Any] = {}
        next_j = 0
        for file_idx, rows in plan.shards:
            wanted = {int(meta.row[m]): int(m) for m in rows.tolist() if int(m) in batch_of}
            if not wanted:
                continue  # nothing of this shard is in these batches (another worker's, or before the resume point)
            received: set[int] = set()
            rows_iter = self._read_rows(file_idx, sorted(wanted))
            while True:
                try:
                    row, record = next(rows_iter)
                except StopIteration:
                    break
                except Exception as err:  # an unreadable shard: its rows stand in (counted), the epoch goes on
                    logger.error("%s: its remaining rows stand in as skipped utterances", err)
                    break
                m = wanted[row]
                if record["id"] != meta.id[m]:
                    raise StreamMismatchError(
                        f"{meta.files[file_idx]} row {row} is {record['id']!r}, metadata says "
                        f"{meta.id[m]!r}: the prepared dataset changed after the split was read"
                    )
                held[m] = record
                received.add(m)
                missing[batch_of[m]] -= 1
                while next_j < len(batches) and missing[next_j] == 0:
                    yield self._emit(plan.epoch, batches[next_j], positions[next_j], held)
                    next_j += 1
            rows_iter.close()
            for m in wanted.values():
                if m not in received:  # the shard ended early or failed: these rows stand in as silence
                    held[m] = _FAILED
                    missing[batch_of[m]] -= 1
            while next_j < len(batches) and missing[next_j] == 0:
                yield self._emit(plan.epoch, batches[next_j], positions[next_j], held)
                next_j += 1
        if next_j != len(batches):  # cannot happen unless the plan and the shards disagree
            raise RuntimeError(f"{len(batches) - next_j} planned batches never completed")

    def _read_rows(self, file_idx: int, rows: list[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """`(row, record)` for the given rows (ascending) of one Parquet shard, reading only the row
        groups that hold them, one at a time (a row group is the unit Parquet reads)."""
        url = self.split.meta.files[file_idx]
        fs, path = fsspec.core.url_to_fs(url)
        with reading_shard(url), fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            starts, groups = row_groups_of(parquet, rows)
            for g, members in itertools.groupby(zip(rows, groups.tolist()), key=lambda row_group: row_group[1]):
                in_group = [r for r, _ in members]
                if g >= parquet.num_row_groups:
                    raise IndexError(f"rows {in_group} are past the end of the file ({starts[-1]} rows)")
                table = parquet.read_row_group(g, columns=READ_COLUMNS)
                local = pa.array([r - int(starts[g]) for r in in_group], type=pa.int64())
                yield from zip(in_group, table.take(local).to_pylist())

    def _emit(self, epoch: int, batch_rows: np.ndarray, position: int, held: dict[int, Any]):
        meta = self.split.meta
        s = self.settings
        max_samples = int(round(s.max_audio_seconds * s.sampling_rate))
        examples, skipped = [], []
        for m in batch_rows.tolist():
            record = held.pop(m)
            utt_id = str(meta.id[m])
            try:
                if record is _FAILED:
                    raise AudioDecodeError("its shard could not be read")
                audio = record.get("audio") or {}
                samples = decode_audio(audio.get("bytes"), s.sampling_rate)
            except AudioDecodeError as err:
                logger.warning("skipping training utterance %s: %s", utt_id, err)
                skipped.append(utt_id)
                # The batch keeps its shape (every rank runs the same steps); the loss ignores it.
                stand_in = np.zeros(int(STAND_IN_SECONDS * s.sampling_rate), dtype=np.float32)
                examples.append({"id": utt_id, "array": stand_in, "text": "", "label": int(meta.label[m]),
                                 "valid": False})
                continue
            offset = crop_offset(len(samples), max_samples, random=s.random_crop, seed=s.seed, epoch=epoch,
                                 utt_id=utt_id)
            examples.append({"id": utt_id, "array": crop(samples, max_samples, offset), "text": record["text"],
                             "label": record["label"], "valid": True})
        return int(position), self.collator(examples), skipped
