"""The training stream: Parquet shards read with `datasets` streaming, batched by the epoch plan.

    split = split_from_config(cfg.data, seed=cfg.train.seed)
    stream = build_train_stream(cfg, split, feature_extractor=fe, tokenizer=tok,
                                rank=accelerator.process_index, world_size=accelerator.num_processes)
    stream.load_state_dicts(saved)           # on resume: every rank's state saved in the checkpoint
    stream.set_epoch(epoch)                  # no-op when resuming inside this very epoch
    sizes = stream.step_utterances()         # utterances per optimizer step, over all ranks
    for batch in stream: ...                 # `stream.state_dict()` now counts this batch as consumed

What each rank trains on, in which batches, is the epoch plan (`emotrain.data.plan`): a pure
function of metadata that gives every rank the same number of batches, so every rank yields
exactly `num_batches()` batches per epoch and the epoch ends everywhere at the same step without
a collective. This module reads and decodes what the plan asks for:

1. Each DataLoader worker streams its shards in plan order with `datasets`
   (`load_dataset("parquet", data_files=..., streaming=True)`, one shard at a time via `.shard`),
   keeps the bytes of rows whose batch is not complete yet (bounded by the shuffle and bucket
   buffers, as in a real shuffle buffer), and as soon as the next planned batch is complete decodes
   it (soundfile, soxr), crops it (seeded by (seed, epoch, id)), tokenises and collates it.
2. torch's DataLoader round-robins workers; batches carry their position in the rank's sequence
   and the stream yields them in that order. The stream is NOT passed through
   `accelerator.prepare`: it is sharded across ranks already, and Accelerate would shard (or
   dispatch) it a second time.

Bad data never changes the batch structure: an utterance whose audio cannot be decoded (or whose
shard cannot be read) stands in as a 0.1 s silence with `valid == False` in its batch (the loss
leaves it out), is logged with its id and appended to `stream.skipped`; the epoch goes on.

Resume. A rank's state is `{epoch, position}` (batches of the epoch already yielded) plus what the
plan depends on: world size, workers, accumulation, and fingerprints of the split, of the shard
layout (files and the ids in each, in row order) and of the plan settings. Restoring on the same
number of processes and workers replays the plan and skips, without decoding, the rows of
already-yielded batches. Restoring on another number (a requeued job on fewer or more GPUs)
collects every old rank's consumed rows, and plans the rest of that epoch over the new ranks:
every utterance not yet seen in the epoch is seen exactly once; later epochs follow the new world
size. Anything else that changed is an error naming it (re-prepared shards would otherwise
silently repeat some utterances and skip others).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import PurePosixPath
from typing import Any, Iterator

import datasets
import datasets.config
import fsspec.asyn
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data._utils.pin_memory import pin_memory

from emotrain.config import Config
from emotrain.data.audio import AudioDecodeError, crop, crop_offset, decode_audio
from emotrain.data.batching import Collator
from emotrain.data.folds import FoldSplit, Metadata
from emotrain.data.plan import EpochPlan, StreamSettings, plan_epoch, step_utterances

# A shuffled Parquet stream otherwise sleeps 5 s at the end of every pass (arrow thread shutdown).
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0

logger = logging.getLogger("emotrain.data")

READ_COLUMNS = ["id", "label", "text", "audio"]
STATE_FORMAT = "emotrain.train_stream/2"
STAND_IN_SECONDS = 0.1
"""A training utterance that cannot be decoded stands in as this much silence, with valid=False."""


# ---------------------------------------------------------------------------------------------
# Reading and decoding (runs in DataLoader workers, or in the main process with num_workers=0).


_FAILED = object()  # a row whose shard could not be read


class StreamMismatchError(RuntimeError):
    """The Parquet shards no longer hold what the metadata (and so the plan) says."""


class _EpochReader(IterableDataset):
    """Yields `(position, batch, skipped ids)` for the planned batches from `start` on."""

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
        if info is None:
            yield from self._produce(0)  # in-process: one logical worker (num_workers=0)
            return
        # A forked worker must not reuse the parent's fsspec event-loop lock (remote filesystems
        # hang otherwise); datasets does the same in its own worker path, which we bypass.
        fsspec.asyn.reset_lock()
        yield from self._produce((info.id + self.rotation) % len(self.plan.workers))

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
                if m not in received:  # the shard ended early or failed: these rows stand in as silence
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
                # The batch keeps its shape (every rank runs the same steps); the loss ignores it.
                stand_in = np.zeros(int(STAND_IN_SECONDS * s.sampling_rate), dtype=np.float32)
                examples.append({"id": utt_id, "array": stand_in, "text": "", "label": int(meta.label[m]),
                                 "valid": False})
                continue
            offset = crop_offset(
                len(samples), max_samples, random=s.random_crop, seed=s.seed, epoch=self.plan.epoch, utt_id=utt_id
            )
            examples.append({"id": utt_id, "array": crop(samples, max_samples, offset), "text": record["text"],
                             "label": record["label"], "valid": True})
        return int(position), self.collator(examples), skipped


def _identity(item):
    return item


PREFETCH_BATCHES = 4
"""Batches each worker keeps ready (DataLoader's prefetch_factor): dynamic batches vary in cost."""


# ---------------------------------------------------------------------------------------------
# What a resume state must agree on.


def layout_fingerprint(meta: Metadata) -> dict[str, Any]:
    """The shard layout: which files (by their name inside the dataset folder, so a moved or
    remote copy still matches) hold which ids in which row order, and their durations (the plan
    buckets by duration: re-encoded or trimmed audio would plan other batches)."""
    names = [str(PurePosixPath(*PurePosixPath(str(url).replace("\\", "/")).parts[-2:])) for url in meta.files]
    rows = [meta.id[meta.file == f].tolist() for f in range(len(meta.files))]
    durations = np.round(meta.duration, 4).tolist()
    return {"files": len(names), "names": _digest(names), "rows": _digest(rows), "durations": _digest(durations)}


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, separators=(",", ":")).encode(), digest_size=8).hexdigest()


def _encode_mask(mask: np.ndarray | None) -> str | None:
    return None if mask is None else base64.b64encode(np.packbits(mask).tobytes()).decode()


def _decode_mask(text: str | None, length: int) -> np.ndarray | None:
    if text is None:
        return None
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    if len(bits) < length:
        raise ValueError("stream state: the consumed-rows mask is shorter than the dataset")
    return bits[:length].astype(bool)


# ---------------------------------------------------------------------------------------------
# The stream the recipe iterates.


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
        self.collator = Collator(feature_extractor, tokenizer, settings.max_text_tokens, settings.sampling_rate)
        self.epoch = 0
        self.position = 0
        self.consumed: np.ndarray | None = None
        """Rows (mask over split.meta) trained on in the current epoch before its plan began:
        set when the epoch was resumed on another number of processes or workers."""
        self.skipped: list[str] = []
        """Ids of training utterances skipped because they could not be decoded (this run + restored)."""
        self._plans: tuple[int, list[EpochPlan]] | None = None
        self._source_ds: datasets.IterableDataset | None = None
        self._source_index = {url: i for i, url in enumerate(split.train_files)}
        self._identity: dict[str, Any] | None = None

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
            plans = plan_epoch(self.split, self.settings, self.world_size, self.num_workers, epoch,
                               self.accumulation, exclude)
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
        if plan.dropped and start == 0:
            logger.warning("epoch %d: %d utterances left out so that every rank has %d batches (a rank holds "
                           "too few utterances: prepare more shards)", self.epoch, plan.dropped, len(plan))
        reader = _EpochReader(self, plan, start)
        pin = torch.cuda.is_available()  # page-locked batches: the recipe's non_blocking copies overlap
        if self.num_workers == 0:
            source = ((p, pin_memory(b) if pin else b, s) for p, b, s in reader)
        else:
            loader = DataLoader(
                reader,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                pin_memory=pin,
                prefetch_factor=PREFETCH_BATCHES,
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
                    yield batch
        finally:
            if hasattr(source, "_shutdown_workers"):
                source._shutdown_workers()
            del source
        if self.position < len(plan):
            raise RuntimeError(f"stream ended at batch {self.position} of {len(plan)} (epoch {self.epoch})")

    # -- resume ----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What a saved state must agree on: the split, the shard layout and the plan settings."""
        if self._identity is None:
            self._identity = {
                "split": self.split.fingerprint(),
                "layout": layout_fingerprint(self.split.meta),
                "settings": asdict(self.settings),
            }
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
            "consumed": _encode_mask(self.consumed),
            "skipped": list(self.skipped),
            **self.identity(),
        }

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Continue exactly where a checkpoint's ranks stopped; `states` holds every rank's
        `state_dict()`, ordered by rank. Another world size or worker count is fine (the rest of the
        epoch is planned anew over the utterances not yet seen); anything else that shaped the plan
        is a ValueError naming what changed."""
        if not states:
            raise ValueError("no stream state to resume from")
        for rank, state in enumerate(states):
            if state.get("format") != STATE_FORMAT:
                raise ValueError(
                    f"stream state of rank {rank} has format {state.get('format')!r}, expected {STATE_FORMAT!r} "
                    "(written by another emotrain version): start a new run in another output_dir"
                )
            if state.get("rank") != rank or state.get("world_size") != len(states):
                raise ValueError(f"stream states are not one per rank 0..{len(states) - 1} (rank {rank}: {state})")
        first = states[0]
        self._check_identity(first)
        if len({(s["epoch"], s["position"]) for s in states}) != 1:
            raise ValueError("the checkpoint's ranks stopped at different batches: it was not taken at a step boundary")
        self.epoch = int(first["epoch"])
        consumed = _decode_mask(first.get("consumed"), len(self.split.meta))
        if (first["world_size"], first["num_workers"], first["accumulation"]) == (
            self.world_size, self.num_workers, self.accumulation,
        ):
            self.position = int(first["position"])
            self.consumed = consumed
            self.skipped = list(states[self.rank].get("skipped", []))
            self._plans = None
            return
        # Another number of processes (or workers): every old rank's consumed rows are this epoch's
        # history, and the rest of the epoch is planned over the new ranks from position 0.
        old_plans = plan_epoch(self.split, self.settings, first["world_size"], first["num_workers"], self.epoch,
                               first["accumulation"], consumed)
        seen = np.zeros(len(self.split.meta), dtype=bool) if consumed is None else consumed.copy()
        for plan in old_plans:
            seen[plan.rows(int(first["position"]))] = True
        self.position = 0
        self.consumed = seen if seen.any() else None
        # The skip count is a total over ranks: rank 0 carries the old ranks' lists.
        self.skipped = [i for s in states for i in s.get("skipped", [])] if self.rank == 0 else []
        self._plans = None

    def _check_identity(self, state: dict[str, Any]) -> None:
        mine = self.identity()
        if state.get("split") != mine["split"]:
            raise ValueError(
                "the fold's split (which utterances train, validate and test) differs from the checkpoint's: "
                "data.fold, the validation settings, train.seed or the prepared data changed"
            )
        old, new = state.get("layout") or {}, mine["layout"]
        if old != new:
            if old.get("names") != new["names"]:
                what = f"{old.get('files')} shard files then, {new['files']} now"
            elif old.get("rows") != new["rows"]:
                what = "the same files hold other rows (or rows in another order)"
            else:
                what = "the same rows have other durations (re-encoded or trimmed audio)"
            raise ValueError(
                f"the prepared data was re-written since the checkpoint ({what}): the rest of epoch "
                f"{state.get('epoch')} cannot be resumed exactly (some utterances would repeat, others be "
                "skipped). Resume on the data the checkpoint was trained on, or start a new run in another output_dir"
            )
        old_settings = state.get("settings") or {}
        changed = [f"{_config_key(key)} {old_settings.get(key)!r} -> {value!r}"
                   for key, value in mine["settings"].items() if old_settings.get(key) != value]
        if changed:
            raise ValueError(f"the batch plan's settings differ from the checkpoint's: {', '.join(changed)}")


def _config_key(setting: str) -> str:
    """The config key behind a `StreamSettings` field (for error messages)."""
    return {"seed": "train.seed", "batch_size": "train.batch_size"}.get(setting, f"data.{setting}")


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
    the stream in `accelerator.prepare` (it is already sharded). `num_workers`: the worker count, the
    same on every rank (it shapes the plan every rank computes); default `cfg.data.workers()` here.
    """
    settings = StreamSettings.from_config(cfg.data, batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    return TrainStream(
        split,
        settings,
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.data.workers(local_processes()) if num_workers is None else num_workers,
        accumulation=cfg.train.gradient_accumulation_steps,
    )


def local_processes() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
