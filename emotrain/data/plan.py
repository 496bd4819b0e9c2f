"""The epoch plan: which utterances every rank trains on, in which batches and in which order.
Pure functions of metadata (id, duration, file, row): an epoch is planned in milliseconds, replayed
on resume, and never saved.

    plans = plan_epoch(split, settings, world_size=4, epoch=3, accumulation=2)
    plans[rank].batch(position)        # metadata row indices of the rank's position-th batch
    step_utterances(plans, 2)          # utterances in each optimizer step, summed over all ranks

How one epoch is planned:

1. Sharding, once, deliberately. The training shards (the Parquet files of the training sessions,
   validation rows removed, and rows already trained on in this epoch removed when resuming on a
   different number of processes) are dealt to ranks by `partition_shards`: whole shards when their
   count divides the world size, otherwise the largest shards whole and the few smallest split row
   by row.
2. Per (seed, epoch, rank, world size) the rank's shard order is shuffled, rows go through a
   simulated streaming shuffle buffer, then duration buckets under a padded-seconds budget (or
   fixed-size batches): the batches one reader of the rank's shards would form, in order. The
   number of DataLoader workers plays no part: they only share out the decoding of these batches
   (the reader), so any worker count, decided per machine, trains on the same batches.
3. Equal steps on every rank. Whole shards hold different numbers of utterances, so ranks get
   different numbers of batches; a rank that ran out first would end the epoch for everyone and the
   others' last batches would be dropped. Instead every rank gets the same number of batches, a
   multiple of the gradient accumulation: ranks with fewer batches split their largest batches in
   two (smaller batches, same utterances) until they have as many. Nothing is dropped, every
   utterance of the epoch is trained on exactly once, and the epoch's step count is known in
   advance on every rank without a collective. (Only when a rank holds fewer utterances than the
   others hold batches is that impossible, e.g. the last few utterances of an epoch resumed on more
   ranks; then the others' last batches are dropped, counted in `EpochPlan.dropped` and logged.)
4. The step sizes (`step_utterances`): the loss of a step is a sum over its utterances divided by
   their count over all ranks and micro-batches, so every utterance weighs the same whatever the
   batch sizes. Each rank computes every rank's plan to know that count.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, fields, make_dataclass
from typing import TYPE_CHECKING

import numpy as np

from emotrain.config import DataConfig
from emotrain.data.audio import cropped_seconds
from emotrain.data.batching import bucket_batches, fixed_batches, ladder_seconds, shuffle_buffer_order

if TYPE_CHECKING:
    from emotrain.data.folds import FoldSplit

Shard = tuple[int, np.ndarray]
"""(index into split.meta.files, metadata row indices of this shard that this part reads)."""


PLAN_FIELDS = DataConfig.plan_fields()
"""The `DataConfig` fields that shape the batch plan or the batches' content (marked `plan_shaping` there)."""


def _settings_from_config(cls, data: DataConfig, batch_size: int, seed: int) -> "StreamSettings":
    return cls(seed=seed, batch_size=batch_size, **{name: getattr(data, name) for name in PLAN_FIELDS})


# Derived from `DataConfig` (its types and defaults), so the two cannot drift: everything that shapes
# the batch plan and the batches' content, and so part of the resume check. Fields: seed, batch_size,
# then PLAN_FIELDS.
StreamSettings = make_dataclass(
    "StreamSettings",
    [("seed", int), ("batch_size", int)]
    + [(f.name, f.type, field(default=f.default)) for f in fields(DataConfig) if f.name in PLAN_FIELDS],
    frozen=True,
    namespace={"from_config": classmethod(_settings_from_config),
               "__doc__": "Everything that shapes the batch plan and the batches' content (part of the resume check)."},
)
StreamSettings.__module__ = __name__  # (make_dataclass's own `module=` needs Python 3.12): pickles by name


# ---------------------------------------------------------------------------------------------
# Sharding.


def partition_shards(shards: list[Shard], parts: int, index: int, whole: bool = True) -> list[Shard]:
    """Part `index` of `parts` of `shards`; every row lands in exactly one part.

    `n % parts == 0`: whole shards, dealt in a snake over the shards sorted by row count (largest
    first): equal shard counts, near-equal rows. Otherwise the `n - n % parts` largest shards are
    dealt whole the same way and the rows of the remaining (smallest) shards are dealt one by one
    (row i of their concatenation to part i % parts): each part reads those few files in full but
    decodes only its rows. `whole=False` deals every row that way (parts differ by one row at
    most). Returned in file order (the epoch plan shuffles that order).
    """
    if not 0 <= index < parts:
        raise ValueError(f"index {index} out of range for {parts} parts")
    order = sorted(range(len(shards)), key=lambda i: (-len(shards[i][1]), shards[i][0]))
    n_whole = len(order) - len(order) % parts if whole else 0
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


def training_shards(split: "FoldSplit", exclude: np.ndarray | None = None) -> list[Shard]:
    """Every training shard with its training rows, in file order.

    Validation rows are removed, and so are the rows where `exclude` (a boolean mask over
    `split.meta`) is True: those already trained on in this epoch, when it is resumed on another
    number of processes. A shard left without rows stays in the list (shard counts decide sharding).
    """
    meta = split.meta
    mask = split.train_mask()
    if exclude is not None:
        mask = mask & ~exclude
    train_files = set(split.train_files)
    shards = []
    for f, url in enumerate(meta.files):
        if url not in train_files:
            continue
        rows = np.flatnonzero((meta.file == f) & mask)
        shards.append((f, rows[np.argsort(meta.row[rows], kind="stable")]))
    return shards


# ---------------------------------------------------------------------------------------------
# One rank's plan.


@dataclass
class EpochPlan:
    epoch: int
    shards: list[Shard]
    """The rank's shards in this epoch's read order."""
    batches: list[np.ndarray]
    """The rank's batches of metadata row indices, in yield order."""
    dropped: int = 0
    """Utterances left out to give every rank the same number of batches (normally 0)."""

    def __len__(self) -> int:
        return len(self.batches)

    def batch(self, position: int) -> np.ndarray:
        return self.batches[position]

    def batch_sizes(self) -> np.ndarray:
        return np.array([len(b) for b in self.batches], dtype=np.int64)

    def utterances(self) -> int:
        return sum(len(b) for b in self.batches)

    def rows(self, stop: int | None = None) -> np.ndarray:
        """Metadata rows of the batches at positions [0, stop), in yield order."""
        parts = self.batches[:stop]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


ONE_READER = (0, 1)
"""Trailing entries of a rank's seed: worker 0 of 1, what a rank's plan was seeded with when each
DataLoader worker still planned shards of its own. Kept so that checkpoints of runs with 0 or 1
worker written then replay the very same plan."""


def plan_rank(
    split: "FoldSplit",
    shards: list[Shard],
    settings: StreamSettings,
    rank: int,
    world_size: int,
    epoch: int,
    whole_shards: bool = True,
) -> EpochPlan:
    """The rank's batches for `epoch` over the epoch's `shards` (`training_shards`), before ranks
    are evened out (see the module docstring). `whole_shards=False` deals rows to ranks instead."""
    meta = split.meta
    rank_shards = partition_shards(shards, world_size, rank, whole=whole_shards)
    # What each utterance pads to in a batch: its cropped duration, up to the length ladder's rung.
    seconds = ladder_seconds(cropped_seconds(meta.duration, settings.max_audio_seconds), settings.length_ladder,
                             settings.sampling_rate, settings.max_audio_seconds)
    rng = np.random.default_rng([settings.seed, epoch, rank, world_size, *ONE_READER])
    rank_shards = [rank_shards[i] for i in rng.permutation(len(rank_shards))]
    read_order = np.concatenate([rows for _, rows in rank_shards]) if rank_shards else np.zeros(0, np.int64)
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
    return EpochPlan(epoch=epoch, shards=rank_shards, batches=[b for b in batches if len(b)])


# ---------------------------------------------------------------------------------------------
# Every rank the same number of batches.


def split_largest_batches(plan: EpochPlan, extra: int) -> EpochPlan:
    """`plan` with `extra` more batches: the batch whose pieces are largest is cut into one more
    piece (consecutive rows, so a duration-sorted bucket stays sorted) until the count is reached.

    Raises ValueError when the plan holds fewer utterances than the wanted number of batches.
    """
    total = plan.utterances()
    if len(plan) + extra > total:
        raise ValueError(f"{total} utterances cannot fill {len(plan) + extra} batches")
    pieces = [1] * len(plan)
    # Max-heap on the current piece size; ties go to the earliest batch.
    heap = [(-len(b), j) for j, b in enumerate(plan.batches)]
    heapq.heapify(heap)
    for _ in range(extra):
        _, j = heapq.heappop(heap)
        pieces[j] += 1
        heapq.heappush(heap, (-len(plan.batches[j]) // pieces[j], j))  # -ceil(size / pieces)
    batches = [piece for b, k in zip(plan.batches, pieces) for piece in np.array_split(b, k)]
    return EpochPlan(epoch=plan.epoch, shards=plan.shards, batches=batches, dropped=plan.dropped)


def truncate(plan: EpochPlan, length: int) -> EpochPlan:
    """The first `length` batches of `plan`."""
    dropped = sum(len(b) for b in plan.batches[length:])
    return EpochPlan(epoch=plan.epoch, shards=plan.shards, batches=plan.batches[:length],
                     dropped=plan.dropped + dropped)


def even_out(plans: list[EpochPlan], accumulation: int) -> list[EpochPlan]:
    """Give every rank the same number of batches, a multiple of `accumulation` (module docstring)."""
    target = -(-max(len(p) for p in plans) // accumulation) * accumulation
    utterances = [p.utterances() for p in plans]
    if min(utterances) < target:
        # A rank cannot fill `target` batches: the others give up their last ones instead.
        target = min(utterances) // accumulation * accumulation
    return [
        split_largest_batches(p, target - len(p)) if len(p) <= target else truncate(p, target)
        for p in plans
    ]


def plan_epoch(
    split: "FoldSplit",
    settings: StreamSettings,
    world_size: int,
    *,
    epoch: int,
    accumulation: int = 1,
    exclude: np.ndarray | None = None,
) -> list[EpochPlan]:
    """Every rank's plan for `epoch` (index = rank), evened out to the same number of batches.

    `exclude`: a boolean mask over `split.meta` of rows already trained on in this epoch (resume on
    another number of processes): the plan covers the rest of the epoch only. What is left of the
    shards then is uneven (some shards are used up, others untouched), so its rows are dealt to
    ranks one by one: every rank gets a near-equal share, at the price of reading the remaining
    shards on every rank for the rest of this one epoch.
    """
    shards = training_shards(split, exclude)
    rest = exclude is not None
    if rest:
        shards = [shard for shard in shards if len(shard[1])]
    plans = [plan_rank(split, shards, settings, rank, world_size, epoch, whole_shards=not rest)
             for rank in range(world_size)]
    return even_out(plans, accumulation)


def step_utterances(plans: list[EpochPlan], accumulation: int) -> np.ndarray:
    """Planned utterances in each optimizer step of the epoch, over all ranks and micro-batches."""
    sizes = np.sum([p.batch_sizes() for p in plans], axis=0) if plans and len(plans[0]) else np.zeros(0, np.int64)
    return sizes.reshape(-1, accumulation).sum(axis=1)
