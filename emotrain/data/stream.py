"""The training stream: Parquet shards read with `datasets` streaming, sharded once, batched on metadata.

    split = split_from_config(cfg.data, seed=cfg.train.seed)
    stream = build_train_stream(cfg, split, feature_extractor=fe, tokenizer=tok,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    stream.load_state_dict(saved)            # on resume: the per-rank state saved in the checkpoint
    for epoch in range(start_epoch, cfg.train.max_epochs):
        stream.set_epoch(epoch)              # no-op when resuming inside this very epoch
        it = iter(stream)
        while all_ranks_true((batch := next(it, None)) is not None, accelerator):
            ...train on batch...             # `stream.state_dict()` now counts this batch as consumed

How the data moves (one rank):

1. Sharding, once, deliberately. The training shards (all Parquet files of the four training
   sessions, 32 with the default layout) are dealt to ranks by `partition_shards`: whole shards when
   `n_shards % world_size == 0` (dealt largest first in a snake, so ranks get equal shard counts and
   near-equal rows); otherwise the largest `n - n % world_size` shards are dealt whole and the few
   remaining smallest shards are split row by row (every rank reads those files, decodes only its
   rows). The same rule then splits a rank's shards across its DataLoader workers. This loader is
   NOT passed through `accelerator.prepare`: Accelerate would shard (or dispatch) the stream a second
   time and each rank would silently drop data.
2. An epoch plan, computed on metadata only (id, duration, file, row; read once by `folds.py`):
   per (seed, epoch, rank, worker) the worker's shard order is shuffled, rows go through a
   simulated shuffle buffer (`data.shuffle_buffer_size`) and then duration buckets
   (`data.bucket_buffer_size`, padded-seconds budget `data.max_batch_audio_seconds`, size cap
   `train.batch_size`) or fixed-size batches (`data.batching=fixed`). The plan is a pure function,
   so it is recomputed, never saved. Validation rows are never in it.
3. Reading: each worker streams its shards in plan order with `datasets`
   (`load_dataset("parquet", data_files=..., streaming=True)`, one shard at a time via `.shard`),
   keeps the bytes of rows whose batch is not complete yet (bounded by the two buffers, as in a
   real shuffle buffer), and as soon as the next planned batch is complete decodes it (soundfile,
   soxr), crops it (seeded by (seed, epoch, id)), tokenises and collates it.
4. Workers: torch's DataLoader round-robins workers; batches carry their index in the rank's
   canonical sequence (worker 0's batch 0, worker 1's batch 0, ..., worker 0's batch 1, ...) and
   the stream yields them in that order.

State (per rank, small, JSON-serialisable): `{epoch, position}` (batches of the epoch already
yielded) plus the identity of the plan (rank, world size, workers, a fingerprint of split and
settings) and the ids skipped so far. Restoring replays the plan and skips, without decoding, the
rows of already-yielded batches; files whose rows are all consumed are not even opened. The next
batches are exactly those the uninterrupted stream would have produced.

Bad data: an utterance whose audio cannot be decoded (or a shard that cannot be read) is skipped,
logged with its id and appended to `stream.skipped`; the epoch goes on.

Ranks can get different numbers of batches: stop the epoch collectively with
`emotrain.distributed.all_ranks_true` (one MIN all-reduce per step), or equalise with `num_batches()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import datasets
import datasets.config
import fsspec.asyn
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emotrain.config import Config, DataConfig
from emotrain.data.audio import (
    AudioDecodeError,
    crop,
    crop_offset,
    cropped_seconds,
    decode_audio,
)
from emotrain.data.batching import (
    Collator,
    bucket_batches,
    fixed_batches,
    shuffle_buffer_order,
)
from emotrain.data.folds import FoldSplit
from emotrain.distributed import all_ranks_true

# A shuffled Parquet stream otherwise sleeps 5 s at the end of every pass (arrow thread shutdown).
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

logger = logging.getLogger("emotrain.data")

READ_COLUMNS = ["id", "label", "text", "audio"]
STATE_FORMAT = "emotrain.train_stream/1"

Shard = tuple[int, np.ndarray]
"""(index into split.meta.files, metadata row indices of this shard that this part reads)."""


@dataclass(frozen=True)
class StreamSettings:
    """Everything that shapes the batch plan (part of the resume fingerprint)."""

    seed: int
    batch_size: int
    batching: str = "bucket"
    max_batch_audio_seconds: float = 80.0
    bucket_buffer_size: int = 256
    shuffle_buffer_size: int = 512
    max_audio_seconds: float = 15.0
    random_crop: bool = True
    max_text_tokens: int = 64
    sampling_rate: int = 16000

    @classmethod
    def from_config(cls, data: DataConfig, batch_size: int, seed: int) -> "StreamSettings":
        return cls(
            seed=seed,
            batch_size=batch_size,
            batching=data.batching,
            max_batch_audio_seconds=data.max_batch_audio_seconds,
            bucket_buffer_size=data.bucket_buffer_size,
            shuffle_buffer_size=data.shuffle_buffer_size,
            max_audio_seconds=data.max_audio_seconds,
            random_crop=data.random_crop,
            max_text_tokens=data.max_text_tokens,
            sampling_rate=data.sampling_rate,
        )


# ---------------------------------------------------------------------------------------------
# Sharding (ranks, then workers) and the epoch plan: pure functions of metadata.


def partition_shards(shards: list[Shard], parts: int, index: int) -> list[Shard]:
    """Part `index` of `parts` of `shards`; every row lands in exactly one part.

    `n % parts == 0`: whole shards, dealt in a snake over the shards sorted by row count (largest
    first): equal shard counts, near-equal rows. Otherwise the `n - n % parts` largest shards are
    dealt whole the same way and the rows of the remaining (smallest) shards are dealt one by one
    (row i of their concatenation to part i % parts): each part reads those few files in full but
    decodes only its rows. Returned in file order (the epoch plan shuffles that order).
    """
    if not 0 <= index < parts:
        raise ValueError(f"index {index} out of range for {parts} parts")
    order = sorted(range(len(shards)), key=lambda i: (-len(shards[i][1]), shards[i][0]))
    n_whole = len(order) - len(order) % parts
    mine: list[Shard] = []
    for pos, i in enumerate(order[:n_whole]):
        round_, j = divmod(pos, parts)
        owner = j if round_ % 2 == 0 else parts - 1 - j
        if owner == index:
            mine.append(shards[i])
    counter = 0
    for i in sorted(order[n_whole:], key=lambda i: shards[i][0]):
        file_idx, rows = shards[i]
        take = [r for k, r in enumerate(rows) if (counter + k) % parts == index]
        counter += len(rows)
        if take:
            mine.append((file_idx, np.asarray(take, dtype=np.int64)))
    mine.sort(key=lambda s: s[0])
    return mine


def training_shards(split: FoldSplit) -> list[Shard]:
    """Every training shard with its training rows (validation rows removed), in file order."""
    meta = split.meta
    mask = split.train_mask()
    train_files = set(split.train_files)
    train_file_idx = [i for i, url in enumerate(meta.files) if url in train_files]
    shards = []
    for f in train_file_idx:
        rows = np.flatnonzero((meta.file == f) & mask)
        rows = rows[np.argsort(meta.row[rows], kind="stable")]
        shards.append((f, rows))
    return shards


@dataclass
class WorkerPlan:
    shards: list[Shard]
    """The worker's shards in this epoch's read order."""
    batches: list[np.ndarray]
    """Batches of metadata row indices, in the order the worker yields them."""
    canonical: np.ndarray
    """Position of each of these batches in the rank's canonical sequence."""


@dataclass
class EpochPlan:
    epoch: int
    workers: list[WorkerPlan]
    sequence: list[tuple[int, int]]
    """The rank's batches in yield order: (logical worker, its batch index), round-robin."""

    def __len__(self) -> int:
        return len(self.sequence)

    def batch(self, position: int) -> np.ndarray:
        w, j = self.sequence[position]
        return self.workers[w].batches[j]


def plan_epoch(
    split: FoldSplit, settings: StreamSettings, rank: int, world_size: int, num_workers: int, epoch: int
) -> EpochPlan:
    """The rank's batches for `epoch`: a pure function of metadata, settings and (rank, worker)."""
    meta = split.meta
    rank_shards = partition_shards(training_shards(split), world_size, rank)
    n_logical = max(1, num_workers)
    seconds = cropped_seconds(meta.duration, settings.max_audio_seconds)
    workers = []
    for w in range(n_logical):
        shards = partition_shards(rank_shards, n_logical, w)
        rng = np.random.default_rng([settings.seed, epoch, rank, world_size, w, n_logical])
        shards = [shards[i] for i in rng.permutation(len(shards))]
        read_order = np.concatenate([rows for _, rows in shards]) if shards else np.zeros(0, np.int64)
        order = shuffle_buffer_order(read_order, settings.shuffle_buffer_size, rng)
        if settings.batching == "bucket":
            batches = bucket_batches(
                order,
                seconds[order],
                buffer_size=settings.bucket_buffer_size,
                max_batch_seconds=settings.max_batch_audio_seconds,
                max_batch_size=settings.batch_size,
                rng=rng,
            )
        elif settings.batching == "fixed":
            batches = fixed_batches(order, settings.batch_size)
        else:
            raise ValueError(f"unknown batching {settings.batching!r}")
        workers.append(WorkerPlan(shards=shards, batches=batches, canonical=np.zeros(0, np.int64)))
    sequence: list[tuple[int, int]] = []
    canonical: list[list[int]] = [[] for _ in workers]
    round_ = 0
    while True:
        added = False
        for w, plan in enumerate(workers):
            if round_ < len(plan.batches):
                canonical[w].append(len(sequence))
                sequence.append((w, round_))
                added = True
        if not added:
            break
        round_ += 1
    for plan, positions in zip(workers, canonical):
        plan.canonical = np.asarray(positions, dtype=np.int64)
    return EpochPlan(epoch=epoch, workers=workers, sequence=sequence)


# ---------------------------------------------------------------------------------------------
# Reading and decoding (runs in DataLoader workers, or in the main process with num_workers=0).


_FAILED = object()  # a row whose shard could not be read


class StreamMismatchError(RuntimeError):
    """The Parquet shards no longer hold what the metadata (and so the plan) says."""


class _EpochReader(IterableDataset):
    """Yields `(position, batch or None, skipped ids)` for the planned batches from `start` on."""

    def __init__(self, stream: "TrainStream", plan: EpochPlan, start: int):
        super().__init__()
        self.split = stream.split
        self.settings = stream.settings
        self.collator = stream.collator
        self.source = stream._source()
        self.source_index = stream._source_index
        self.plan = plan
        self.start = start
        # With workers, the DataLoader asks worker 0 first: worker 0 plays the logical worker
        # whose batch comes next, and the rest follow in the canonical round-robin order.
        self.rotation = plan.sequence[start][0] if start < len(plan) else 0

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else None
        if physical is not None:
            # A forked worker must not reuse the parent's fsspec event-loop lock (remote filesystems
            # hang otherwise); datasets does the same in its own worker path, which we bypass.
            fsspec.asyn.reset_lock()
        if physical is None:
            # In-process: one logical worker (num_workers=0).
            yield from self._produce(0)
        else:
            yield from self._produce((physical + self.rotation) % len(self.plan.workers))

    def _produce(self, w: int):
        plan = self.plan.workers[w]
        first = int(np.searchsorted(plan.canonical, self.start))  # this worker's batches already yielded
        batches = plan.batches[first:]
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
                    yield self._emit(batches[next_j], plan.canonical[first + next_j], held)
                    next_j += 1
            close = getattr(rows_iter, "close", None)
            if close is not None:
                close()
            for m in wanted.values():
                if m not in received:  # the shard ended early or failed: these rows are skipped
                    held[m] = _FAILED
                    missing[batch_of[m]] -= 1
            while next_j < len(batches) and missing[next_j] == 0:
                yield self._emit(batches[next_j], plan.canonical[first + next_j], held)
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

    def _emit(self, batch_rows: np.ndarray, position: int, held: dict[int, Any]):
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
                continue
            offset = crop_offset(
                len(samples), max_samples, random=s.random_crop, seed=s.seed, epoch=self.plan.epoch, utt_id=utt_id
            )
            examples.append(
                {"id": utt_id, "array": crop(samples, max_samples, offset), "text": record["text"], "label": record["label"]}
            )
        return int(position), self.collator(examples), skipped


def _identity(item):
    return item


# ---------------------------------------------------------------------------------------------
# The stream the recipe iterates.


class TrainStream:
    """One rank's training batches, epoch by epoch, with an exact, cheap, per-rank resume state.

    Iterate it (`for batch in stream`) to get the rest of the current epoch; `set_epoch(e)` moves to
    epoch e (position 0) unless e is already the current epoch. See the module docstring.
    """

    def __init__(
        self,
        split: FoldSplit,
        settings: StreamSettings,
        *,
        feature_extractor,
        tokenizer,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        multiprocessing_context: str | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.split = split
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.multiprocessing_context = multiprocessing_context
        self.collator = Collator(feature_extractor, tokenizer, settings.max_text_tokens, settings.sampling_rate)
        self.epoch = 0
        self.position = 0
        self.skipped: list[str] = []
        """Ids of training utterances skipped because they could not be decoded (this run + restored)."""
        self._plan_cache: EpochPlan | None = None
        self._source_ds: datasets.IterableDataset | None = None
        self._source_index = {url: i for i, url in enumerate(split.train_files)}
        self._fingerprint: str | None = None

    # -- epochs and plans ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its first batch; a no-op if `epoch` is the current epoch (resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache.epoch != epoch:
            self._plan_cache = plan_epoch(
                self.split, self.settings, self.rank, self.world_size, self.num_workers, epoch
            )
        return self._plan_cache

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches this rank yields in a whole epoch (fewer if entire batches fail to decode)."""
        return len(self.plan(epoch))

    def epoch_ids(self, epoch: int | None = None) -> list[str]:
        """Ids this rank trains on in `epoch`, in yield order (from the plan; no audio read)."""
        plan = self.plan(epoch)
        meta = self.split.meta
        return [str(meta.id[m]) for p in range(len(plan)) for m in plan.batch(p).tolist()]

    @property
    def remaining(self) -> int:
        """Planned batches of the current epoch not yet yielded."""
        return max(0, len(self.plan()) - self.position)

    # -- iteration -------------------------------------------------------------------------------

    def _source(self) -> datasets.IterableDataset:
        """The `datasets` stream over all training shards (built once, before workers fork)."""
        if self._source_ds is None:
            self._source_ds = datasets.load_dataset(
                "parquet",
                data_files={"train": list(self.split.train_files)},
                split="train",
                streaming=True,
                columns=READ_COLUMNS,
            )
            if self._source_ds.num_shards != len(self.split.train_files):
                raise RuntimeError(
                    f"datasets sees {self._source_ds.num_shards} shards, expected {len(self.split.train_files)}"
                )
        return self._source_ds

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        start = self.position
        if start >= len(plan):
            return
        reader = _EpochReader(self, plan, start)
        if self.num_workers == 0:
            source = iter(reader)
        else:
            loader = DataLoader(
                reader,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                multiprocessing_context=self.multiprocessing_context,
                # Its own generator: creating the iterator would otherwise draw the workers' base
                # seed from the global torch RNG, so a resumed run (which creates it mid-epoch)
                # would drift from the uninterrupted one (dropout masks). Workers need no
                # randomness of their own: the plan and the crops are seeded explicitly.
                generator=torch.Generator().manual_seed(self.settings.seed),
            )
            source = iter(loader)
        pending: dict[int, tuple[Any, list[str]]] = {}
        try:
            for position, batch, skipped in source:
                pending[position] = (batch, skipped)
                # Yield in canonical order, whatever order workers delivered in.
                while self.position in pending:
                    batch, skipped = pending.pop(self.position)
                    self.position += 1
                    self.skipped.extend(skipped)
                    if batch is not None:
                        yield batch
        finally:
            if hasattr(source, "_shutdown_workers"):
                source._shutdown_workers()
            del source
        if self.position < len(plan):
            raise RuntimeError(f"stream ended at batch {self.position} of {len(plan)} (epoch {self.epoch})")

    # -- resume ----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A short hash of the split and the plan settings (a state only fits the same ones)."""
        if self._fingerprint is None:
            payload = json.dumps([self.split.fingerprint(), asdict(self.settings)], sort_keys=True)
            self._fingerprint = hashlib.blake2b(payload.encode(), digest_size=8).hexdigest()
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: small and JSON-serialisable (save one file per rank)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "fingerprint": self.fingerprint(),
            "skipped": list(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; the plan identity must match.

        Raises ValueError when the state comes from another rank, world size, worker count, split
        or batching setup: the remaining batches of that epoch could not be reproduced.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a training stream state: format={state.get('format')!r}")
        expected = {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "fingerprint": self.fingerprint(),
        }
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"stream state has {key}={state.get(key)!r} but this stream has {value!r}: "
                    "resume with the same world size, data.num_workers, split and batching settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.skipped = list(state.get("skipped", []))


def build_train_stream(
    cfg: Config,
    split: FoldSplit,
    *,
    feature_extractor,
    tokenizer,
    rank: int = 0,
    world_size: int = 1,
) -> TrainStream:
    """The rank's `TrainStream` from a config (batch size cap and seed from `cfg.train`).

    Pass `rank=accelerator.process_index, world_size=accelerator.num_processes`, and do not wrap
    the stream in `accelerator.prepare` (it is already sharded).
    """
    settings = StreamSettings.from_config(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    return TrainStream(
        split,
        settings,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.num_workers,
    )


# ---------------------------------------------------------------------------------------------
# Uneven ranks.


def lockstep(batches, accelerator=None) -> Iterator[Any]:
    """Yield from `batches` while every rank still has one.

    As soon as one rank is exhausted, every rank stops (one MIN all-reduce per item, on every rank),
    so no rank waits alone in a collective the others never reach. A rank that still had a batch
    drops it (it counts as consumed in the stream state; the epoch is over anyway).
    """
    it = iter(batches)
    while True:
        batch = next(it, None)
        if not all_ranks_true(batch is not None, accelerator):
            close = getattr(it, "close", None)
            if close is not None:
                close()
            return
        yield batch
