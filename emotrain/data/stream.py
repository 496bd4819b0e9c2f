"""The training stream: one rank's batches, epoch by epoch, with an exact resume state.

    split = split_from_config(cfg.data, seed=cfg.train.seed)
    stream = build_train_stream(cfg, split, feature_extractor=fe, tokenizer=tok,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    stream.load_state_dicts(saved)           # on resume: every rank's state saved in the checkpoint
    stream.set_epoch(epoch)                  # no-op when resuming inside this very epoch
    sizes = stream.step_utterances()         # utterances per optimizer step, over all ranks
    steps_ahead(stream, max_epochs=10, max_steps_left=None)   # (steps left in the run, exact?)
    for batch in stream: ...                 # `stream.state_dict()` now counts this batch as consumed

Three parts, one module each:
- what each rank trains on, in which batches, is the epoch plan (`emotrain.data.plan`): a pure
  function of metadata that gives every rank the same number of batches, so every rank yields
  exactly `num_batches()` batches per epoch and the epoch ends everywhere at the same step
  without a collective;
- the reader (`emotrain.data.reader`) reads and decodes what the plan asks for, in persistent
  DataLoader workers (started at the first batch, kept for every later epoch) that share out the
  decoding of the rank's batches: the worker count changes no batch, only how fast they come;
- the state (`emotrain.data.state`) is what a checkpoint keeps per rank, and its checks.

torch's DataLoader round-robins workers; batches carry their position in the rank's sequence and
the stream yields them in that order. The stream is NOT passed through `accelerator.prepare`: it
is sharded across ranks already, and Accelerate would shard (or dispatch) it a second time.

Resume. Restoring on the same number of processes (and accumulation) replays the plan and skips,
without decoding, the rows of already-yielded batches, whatever the number of data workers then and
now (a requeued job on a node with other cores: the same batches). Restoring on another number of
processes (a requeued job on fewer or more GPUs) collects every old rank's consumed rows, and plans
the rest of that epoch over the new ranks: every utterance not yet seen in the epoch is seen exactly
once; later epochs follow the new world size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils.pin_memory import pin_memory

from emotrain.config import Config
from emotrain.data.batching import Collator
from emotrain.data.folds import FoldSplit
from emotrain.data.plan import EpochPlan, StreamSettings, plan_epoch, step_utterances
from emotrain.data.reader import FAILED_POSITION, PREFETCH_BATCHES, EpochReader, PassControl
from emotrain.data.state import (
    STATE_FORMAT,
    check_identity,
    check_states,
    data_fingerprint,
    decode_mask,
    encode_mask,
)

logger = logging.getLogger("emotrain.data")


def _identity(item):
    return item


class TrainStream:
    """One rank's training batches, epoch by epoch, with an exact, small, per-rank resume state.

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
        accumulation: int = 1,
        multiprocessing_context: str | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.split = split
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.accumulation = accumulation
        self.multiprocessing_context = multiprocessing_context
        self.collator = Collator(feature_extractor, tokenizer, settings.max_text_tokens, settings.sampling_rate,
                                 length_ladder=settings.length_ladder,
                                 max_audio_samples=int(round(settings.max_audio_seconds * settings.sampling_rate)))
        self.epoch = 0
        self.position = 0
        self.consumed: np.ndarray | None = None
        """Rows (mask over split.meta) trained on in the current epoch before its plan began:
        set when the epoch was resumed on another number of processes (or accumulation)."""
        self.skipped: list[str] = []
        """Ids of training utterances skipped because they could not be decoded (this run + restored)."""
        self._plans: tuple[int, list[EpochPlan]] | None = None
        self._identity: dict[str, Any] | None = None
        self._reader: EpochReader | None = None
        self._loader: DataLoader | None = None  # the persistent workers (num_workers > 0)
        self._passes = 0  # iterations started (the newest owns the workers)

    # -- epochs and plans ------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its first batch; a no-op if `epoch` is the current epoch (resume)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self.consumed = None

    def plans(self, epoch: int | None = None) -> list[EpochPlan]:
        """Every rank's plan for `epoch` (the current one by default), index = rank."""
        epoch = self.epoch if epoch is None else epoch
        if self._plans is None or self._plans[0] != epoch:
            exclude = self.consumed if epoch == self.epoch else None
            plans = plan_epoch(self.split, self.settings, self.world_size, epoch=epoch,
                               accumulation=self.accumulation, exclude=exclude)
            if epoch != self.epoch:
                return plans  # a look ahead (step counts): not worth keeping
            self._plans = (epoch, plans)
        return self._plans[1]

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan."""
        return self.plans(epoch)[self.rank]

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches every rank yields in `epoch` (the same on all ranks)."""
        return len(self.plan(epoch))

    def steps_in_epoch(self, epoch: int | None = None) -> int:
        """Optimizer steps in `epoch` (of its current plan, for a resumed epoch)."""
        return self.num_batches(epoch) // self.accumulation

    def step_utterances(self, epoch: int | None = None) -> np.ndarray:
        """Planned utterances in each optimizer step of `epoch`, over all ranks and micro-batches."""
        return step_utterances(self.plans(epoch), self.accumulation)

    @property
    def steps_done(self) -> int:
        """Optimizer steps of the current epoch's plan already taken (the batches yielded)."""
        return self.position // self.accumulation

    # -- iteration -------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[int, Any, list[str]]]:
        """`(position, batch, skipped ids)` of the current pass, from the reader or its workers."""
        if self._reader is None:
            control = PassControl(len(self.split.meta), self.multiprocessing_context)
            self._reader = EpochReader(self.split, self.settings, self.collator, rank=self.rank,
                                       world_size=self.world_size, accumulation=self.accumulation, control=control)
        # Written before the pass starts; persistent workers read it when they begin the pass.
        self._reader.control.set(self.epoch, self.position, self.consumed)
        pin = torch.cuda.is_available()  # page-locked batches: the recipe's non_blocking copies overlap
        if self.num_workers == 0:
            return ((p, pin_memory(b) if pin else b, s) for p, b, s in self._reader)
        if self._loader is None:
            self._loader = DataLoader(
                self._reader,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=pin,
                prefetch_factor=PREFETCH_BATCHES,
                persistent_workers=True,
                multiprocessing_context=self.multiprocessing_context,
                # Its own generator: creating the iterator would otherwise draw the workers' base
                # seed from the global torch RNG, so a resumed run (which creates it mid-epoch)
                # would drift from the uninterrupted one (dropout masks). Workers need no
                # randomness of their own: the plan and the crops are seeded explicitly.
                generator=torch.Generator().manual_seed(self.settings.seed),
            )
        return iter(self._loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        if self.position >= len(plan):
            return
        if plan.dropped and self.position == 0:
            logger.warning("epoch %d: %d utterances left out so that every rank has %d batches (a rank holds "
                           "too few utterances: prepare more shards)", self.epoch, plan.dropped, len(plan))
        source = self._batches()
        self._passes += 1
        this_pass = self._passes
        pending: dict[int, tuple[Any, list[str]]] = {}
        finished = False
        try:
            for position, batch, skipped in source:
                if position == FAILED_POSITION:  # a data worker's PreparedDataError (see EpochReader)
                    raise batch
                pending[position] = (batch, skipped)
                # Yield in plan order, whatever order workers delivered in.
                while self.position in pending:
                    batch, skipped = pending.pop(self.position)
                    self.position += 1
                    self.skipped.extend(skipped)
                    yield batch
            finished = True
        finally:
            # Left mid-pass (a stop, an error): the workers hold batches of this pass. An older,
            # abandoned pass being collected later must not stop the workers of the current one.
            if not finished and this_pass == self._passes:
                self.close()
        if self.position < len(plan):
            raise RuntimeError(f"stream ended at batch {self.position} of {len(plan)} (epoch {self.epoch})")

    def close(self) -> None:
        """Stop the data workers (the next iteration starts new ones)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()

    # -- resume ----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a saved state must agree on: the split, the shard layout, the labels and the plan settings."""
        if self._identity is None:
            self._identity = {**data_fingerprint(self.split), "settings": asdict(self.settings)}
        return self._identity

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: small and JSON-serialisable (save one file per rank)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self.position,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "accumulation": self.accumulation,
            "consumed": encode_mask(self.consumed),
            "skipped": list(self.skipped),
            **self.identity(),
        }

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue exactly where a checkpoint's ranks stopped; `states` holds every rank's
        `state_dict()`, ordered by rank. Another worker count changes nothing (the same plan goes
        on); another world size or accumulation is fine (the rest of the epoch is planned anew over
        the utterances not yet seen); anything else that shaped the plan is a ValueError naming what
        changed."""
        check_states(states)
        first = states[0]
        check_identity(first, self.identity())
        self.epoch = int(first["epoch"])
        consumed = decode_mask(first.get("consumed"), len(self.split.meta))
        self._plans = None
        if (first["world_size"], first["accumulation"]) == (self.world_size, self.accumulation):
            self.position = int(first["position"])
            self.consumed = consumed
            self.skipped = list(states[self.rank].get("skipped", []))
            return
        # Another number of processes (or accumulation): every old rank's consumed rows are this
        # epoch's history, and the rest of the epoch is planned over the new ranks from position 0.
        old_plans = plan_epoch(self.split, self.settings, first["world_size"], epoch=self.epoch,
                               accumulation=first["accumulation"], exclude=consumed)
        seen = np.zeros(len(self.split.meta), dtype=bool) if consumed is None else consumed.copy()
        for plan in old_plans:
            seen[plan.rows(int(first["position"]))] = True
        self.position = 0
        self.consumed = seen if seen.any() else None
        # The skip count is a total over ranks: rank 0 carries the old ranks' lists.
        self.skipped = [i for s in states for i in s.get("skipped", [])] if self.rank == 0 else []


COUNTED_EPOCHS = 100
"""Epochs `steps_ahead` plans at most to count a run's steps; beyond them it extrapolates."""


def steps_ahead(stream: TrainStream, *, max_epochs: int, max_steps_left: int | None,
                counted_epochs: int = COUNTED_EPOCHS) -> tuple[int, bool]:
    """(optimizer steps from the stream's position to the end of epoch `max_epochs - 1`, or
    `max_steps_left` when that bound comes first; whether that count is exact).

    Only a display needs it (the log's step count, the progress bar): training itself plans each
    epoch when it gets there, and its learning rate follows the run's share of data seen
    (`emotrain.train.optim`), not a step count. So the epochs ahead are planned one by one, and
    counting stops as soon as `max_steps_left` is reached, or after `counted_epochs` epochs, whose
    mean is then extrapolated to the rest: a huge `max_epochs` (bounded by `max_steps`, or not)
    costs at most that many plans (`counted_epochs` >= 1), not one per epoch.
    """
    def bounded(steps: int) -> bool:
        return max_steps_left is not None and steps >= max_steps_left

    left = stream.steps_in_epoch() - stream.steps_done if stream.epoch < max_epochs else 0
    exact, counted, epoch = True, 0, stream.epoch + 1
    while epoch < max_epochs and not bounded(left):
        if epoch - stream.epoch > counted_epochs:
            left += round(counted / counted_epochs * (max_epochs - epoch))
            exact = False
            break
        steps = stream.steps_in_epoch(epoch)
        left, counted, epoch = left + steps, counted + steps, epoch + 1
    if bounded(left):
        return max_steps_left, exact  # (reached by counting: max_steps is the bound, exactly)
    return left, exact


def build_train_stream(
    cfg: Config,
    split: FoldSplit,
    *,
    feature_extractor,
    tokenizer,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int | None = None,
) -> TrainStream:
    """The rank's `TrainStream` from a config (batch size cap, seed and accumulation from `cfg.train`).

    Pass `rank=accelerator.process_index, world_size=accelerator.num_processes`, and do not wrap
    the stream in `accelerator.prepare` (it is already sharded). `num_workers`: the DataLoader workers
    that decode the rank's batches (any count gives the same batches); default `cfg.data.workers()` here.
    """
    return TrainStream(
        split,
        StreamSettings.from_config(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed),
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.workers() if num_workers is None else num_workers,
        accumulation=cfg.train.gradient_accumulation_steps,
    )
