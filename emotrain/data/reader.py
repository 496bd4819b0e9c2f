"""The reader: streams one rank's planned batches from the Parquet shards and decodes them.

Runs in DataLoader workers (or in the training process with `num_workers=0`). Each logical worker
of the epoch plan streams its shards in plan order with `datasets`
(`load_dataset("parquet", data_files=..., streaming=True)`, one shard at a time via `.shard`),
keeps the bytes of rows whose batch is not complete yet (bounded by the shuffle and bucket
buffers, as in a real shuffle buffer), and as soon as the next planned batch is complete decodes it
(soundfile, soxr), crops it (seeded by (seed, epoch, id)), tokenises and collates it.

The workers are persistent: they are started once and read, at the start of every pass, which
epoch and from which batch the pass covers (`PassControl`, shared memory the main process writes
before each `iter(loader)`), and plan that epoch themselves (`plan_epoch` is a pure function of
metadata: the same plan the main process computes). So an epoch or a resume costs no process start.

Bad data never changes the batch structure: an utterance whose audio cannot be decoded (or whose
shard cannot be read) stands in as a 0.1 s silence with `valid == False` in its batch (the loss
leaves it out), is logged with its id and reported with the batch; the epoch goes on.
"""

from __future__ import annotations

import logging
import multiprocessing
from typing import TYPE_CHECKING, Any, Iterator

import datasets
import datasets.config
import fsspec.asyn
import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from emotrain.data.audio import AudioDecodeError, crop, crop_offset, decode_audio
from emotrain.data.plan import EpochPlan, plan_epoch

if TYPE_CHECKING:
    from emotrain.data.batching import Collator
    from emotrain.data.folds import FoldSplit
    from emotrain.data.plan import StreamSettings

# A shuffled Parquet stream otherwise sleeps 5 s at the end of every pass (arrow thread shutdown).
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

logger = logging.getLogger("emotrain.data")

READ_COLUMNS = ["id", "label", "text", "audio"]
STAND_IN_SECONDS = 0.1
"""A training utterance that cannot be decoded stands in as this much silence, with valid=False."""
PREFETCH_BATCHES = 4
"""Batches each worker keeps ready (DataLoader's prefetch_factor): dynamic batches vary in cost."""

_FAILED = object()  # a row whose shard could not be read


class StreamMismatchError(RuntimeError):
    """The Parquet shards no longer hold what the metadata (and so the plan) says."""


def open_training_source(files: list[str]) -> datasets.IterableDataset:
    """The `datasets` stream over the training shards (built once, before workers start)."""
    source = datasets.load_dataset("parquet", data_files={"train": list(files)}, split="train", streaming=True,
                                   columns=READ_COLUMNS)
    if source.num_shards != len(files):
        raise RuntimeError(f"datasets sees {source.num_shards} shards, expected {len(files)}")
    return source


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
        num_workers: int,
        accumulation: int,
        control: PassControl,
    ):
        super().__init__()
        self.split = split
        self.settings = settings
        self.collator = collator
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.accumulation = accumulation
        self.control = control
        self.source = open_training_source(split.train_files)
        self.source_index = {url: i for i, url in enumerate(split.train_files)}

    def __iter__(self):
        epoch, start, exclude = self.control.get()
        plan = plan_epoch(self.split, self.settings, self.world_size, self.num_workers, epoch, self.accumulation,
                          exclude)[self.rank]
        info = get_worker_info()
        if info is None:
            yield from self._produce(plan, 0, start)  # in-process: one logical worker (num_workers=0)
            return
        # A forked worker must not reuse the parent's fsspec event-loop lock (remote filesystems
        # hang otherwise); datasets does the same in its own worker path, which we bypass.
        fsspec.asyn.reset_lock()
        # The DataLoader asks worker 0 first at every pass: worker 0 plays the logical worker whose
        # batch comes next, and the rest follow in the canonical round-robin order.
        rotation = plan.sequence[start][0] if start < len(plan) else 0
        yield from self._produce(plan, (info.id + rotation) % len(plan.workers), start)

    def _produce(self, plan: EpochPlan, w: int, start: int):
        worker = plan.workers[w]
        first = int(np.searchsorted(worker.canonical, start))  # this worker's batches already yielded
        batches = worker.batches[first:]
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
        for file_idx, rows in worker.shards:
            wanted = {int(meta.row[m]): int(m) for m in rows.tolist() if int(m) in batch_of}
            if not wanted:
                continue  # everything this shard holds for us was consumed before the resume point
            last_row = max(wanted)
            received: set[int] = set()
            rows_iter = self._read_shard(file_idx)
            row = -1
            while row < last_row:
                try:
                    record = next(rows_iter)
                except StopIteration:
                    break
                except Exception as err:  # an unreadable shard: skip its rows, keep the epoch going
                    logger.error("cannot read %s (%s): skipping its remaining rows", meta.files[file_idx], err)
                    break
                row += 1
                m = wanted.get(row)
                if m is None:
                    continue
                if record["id"] != meta.id[m]:
                    raise StreamMismatchError(
                        f"{meta.files[file_idx]} row {row} is {record['id']!r}, metadata says "
                        f"{meta.id[m]!r}: the prepared dataset changed after the split was read"
                    )
                held[m] = record
                received.add(m)
                missing[batch_of[m]] -= 1
                while next_j < len(batches) and missing[next_j] == 0:
                    yield self._emit(plan.epoch, batches[next_j], worker.canonical[first + next_j], held)
                    next_j += 1
            close = getattr(rows_iter, "close", None)
            if close is not None:
                close()
            for m in wanted.values():
                if m not in received:  # the shard ended early or failed: these rows stand in as silence
                    held[m] = _FAILED
                    missing[batch_of[m]] -= 1
            while next_j < len(batches) and missing[next_j] == 0:
                yield self._emit(plan.epoch, batches[next_j], worker.canonical[first + next_j], held)
                next_j += 1
        if next_j != len(batches):  # cannot happen unless the plan and the shards disagree
            raise RuntimeError(f"worker {w}: {len(batches) - next_j} planned batches never completed")

    def _read_shard(self, file_idx: int) -> Iterator[dict[str, Any]]:
        """The rows of one Parquet shard, in file order, streamed by `datasets`."""
        url = self.split.meta.files[file_idx]
        shard = self.source.shard(num_shards=self.source.num_shards, index=self.source_index[url])
        # `.iter(batch_size)`, not `iter(shard)`: inside a DataLoader worker `IterableDataset.__iter__`
        # would split the (single) shard across workers a second time and starve all but one.
        for rows in shard.iter(batch_size=64):
            columns = list(rows)
            for values in zip(*(rows[c] for c in columns)):
                yield dict(zip(columns, values))

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
