"""Validation and test data: map-style datasets, full audio, every utterance exactly once.

    val_set, test_set = build_eval_datasets(split, sampling_rate=cfg.data.sampling_rate)
    val_loader = build_eval_dataloader(val_set, cfg.data, feature_extractor=fe, tokenizer=tok,
                                       rank=accelerator.process_index, world_size=accelerator.num_processes)
    metrics = emotrain.train.evaluation.evaluate(accelerator, model, val_loader)

Utterances are sorted by (duration, id) and cut into batches under a budget of padded audio
(`data.eval_max_batch_audio_seconds`, at most `data.eval_batch_size` utterances; an utterance
longer than the budget is a batch alone): evaluation sees full audio, up to 34 s on IEMOCAP, so a
fixed count of utterances per batch would either pad a lot or run out of memory on the long end.
The batches are planned on metadata and dealt to the ranks in turn (`EvalBatchSampler`), each
utterance to exactly one rank; a rank with one batch fewer gets a filler (the shortest utterance,
`valid=False`, id `FILLER_ID`), so every rank runs the same number of forwards (ZeRO-3 needs it).
These loaders are therefore NOT passed through `accelerator.prepare` (its even-batches padding
assumes a fixed batch size); `evaluate` moves batches to the device and gathers the predictions
once at the end.

The rows (ids, labels, text, encoded audio bytes) of the split are read into memory once, reading
only the Parquet row groups that hold them; audio is decoded in `__getitem__`. An utterance whose
audio cannot be decoded is logged and stands in as a 0.1 s silence with `valid=False` in the
batch, and `evaluate` counts it in `n_skipped`. `dataset.skipped` lists them too, but only in the
process that decoded them (the main process with num_workers=0, a worker otherwise).
"""

from __future__ import annotations

import logging
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from emotrain.config import SAMPLING_RATE, ConfigError, DataConfig
from emotrain.data.audio import AudioDecodeError, decode_audio
from emotrain.data.batching import Collator, cut_sorted, ladder_seconds
from emotrain.data.folds import FoldSplit, Metadata
from emotrain.data.shards import REPREPARE, PreparedDataError, reading_shard, row_groups_of

logger = logging.getLogger("emotrain.data")

EVAL_COLUMNS = ["id", "label", "text", "audio"]


def _read_rows(url: str, rows: list[int]) -> pa.Table:
    """The given rows (in that order) of one Parquet file, reading only the row groups holding them."""
    fs, path = fsspec.core.url_to_fs(url)
    with reading_shard(url), fs.open(path, "rb") as handle:  # a damaged shard: one line naming it
        parquet = pq.ParquetFile(handle)
        starts, group_of = row_groups_of(parquet, rows)
        groups = sorted(set(group_of.tolist()))
        table = parquet.read_row_groups(groups, columns=EVAL_COLUMNS)
    # Where each row group read starts in the table just read.
    offset = dict(zip(groups, np.cumsum([0] + [int(starts[g + 1] - starts[g]) for g in groups])))
    local = [int(offset[g] + r - starts[g]) for r, g in zip(rows, group_of.tolist())]
    return table.take(pa.array(local, type=pa.int64()))


class EvalDataset(Dataset):
    """Utterances `ids` of the prepared rows in `meta`, sorted by (duration, id); `__getitem__`
    decodes one (full length)."""

    def __init__(self, meta: Metadata, ids: tuple[str, ...] | list[str], sampling_rate: int = SAMPLING_RATE, name: str = "eval"):
        self.name = name
        self.sampling_rate = sampling_rate
        self.skipped: list[str] = []
        """Ids that failed to decode in this process (each stood in as silence, valid=False)."""
        wanted = set(ids)
        index = np.flatnonzero(np.isin(meta.id, np.array(sorted(wanted), dtype=object)))
        if len(index) != len(wanted):
            raise ValueError(f"{name}: {len(wanted) - len(index)} ids are not in the prepared dataset")
        order = sorted(index.tolist(), key=lambda m: (float(meta.duration[m]), str(meta.id[m])))
        by_file: dict[int, list[int]] = {}
        for m in order:
            by_file.setdefault(int(meta.file[m]), []).append(m)
        records: dict[int, tuple[str, int, str, bytes | None]] = {}
        for f, ms in by_file.items():
            table = _read_rows(meta.files[f], [int(meta.row[m]) for m in ms])
            got_ids = table.column("id").to_pylist()
            labels = table.column("label").to_pylist()
            texts = table.column("text").to_pylist()
            audio = table.column("audio").combine_chunks().field("bytes")
            for k, m in enumerate(ms):
                if got_ids[k] != meta.id[m]:
                    raise PreparedDataError(f"{meta.files[f]} row {meta.row[m]} is {got_ids[k]!r}, but the dataset's "
                                            f"metadata says {meta.id[m]!r}: the prepared dataset changed after it was "
                                            f"read; {REPREPARE}")
                records[m] = (got_ids[k], labels[k], texts[k] or "", audio[k].as_py())
        self.ids = [records[m][0] for m in order]
        self.labels = np.array([records[m][1] for m in order], dtype=np.int64)
        self.texts = [records[m][2] for m in order]
        self.audio = pa.array([records[m][3] for m in order], type=pa.binary())
        self.durations = np.array([float(meta.duration[m]) for m in order])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:  # a filler (see EvalBatchSampler): the shortest utterance, never scored
            return {**self[0], "id": FILLER_ID, "valid": False}
        utt_id = self.ids[i]
        valid = True
        try:
            samples = decode_audio(self.audio[i].as_py(), self.sampling_rate)
        except AudioDecodeError as err:
            logger.warning("%s: utterance %s cannot be decoded (%s): silence stands in, valid=False", self.name, utt_id, err)
            self.skipped.append(utt_id)
            samples = np.zeros(self.sampling_rate // 10, dtype=np.float32)
            valid = False
        return {"id": utt_id, "array": samples, "text": self.texts[i], "label": int(self.labels[i]), "valid": valid}


def build_eval_datasets(split: FoldSplit, sampling_rate: int = SAMPLING_RATE) -> tuple[EvalDataset, EvalDataset | None]:
    """(validation, test) datasets of a fold; test is None for fold 0."""
    validation = EvalDataset(split.meta, split.validation_ids, sampling_rate, name="validation")
    test = None if split.test_ids is None else EvalDataset(split.meta, split.test_ids, sampling_rate, name="test")
    return validation, test


def check_validation_set(dataset: EvalDataset, fold: int) -> None:
    """Refuse, before training, a validation set that could never score a model: empty, or with no
    utterance that decodes (model selection would fail after the first epoch). Decodes utterances
    until one succeeds: one, normally."""
    if len(dataset) == 0:
        raise ConfigError("data.validation", f"fold {fold} has no validation utterances: hold out more "
                          "(data.validation_speakers, data.validation_fraction) or check the data's groups")
    reasons = {}
    for utt_id, audio in zip(dataset.ids, dataset.audio):
        try:
            decode_audio(audio.as_py(), dataset.sampling_rate)
            return
        except AudioDecodeError as err:
            reasons[utt_id] = str(err)
    first = next(iter(reasons))
    raise ConfigError("data.path", f"none of the {len(dataset)} validation utterances of fold {fold} can be decoded "
                      f"(e.g. {first}: {reasons[first]}): the prepared audio is damaged; prepare the data again")


FILLER_ID = "<filler>"
"""The id of a filler row: evens out the ranks' batch counts, never scored."""


class EvalBatchSampler(Sampler[list[int]]):
    """This rank's batches of a duration-sorted EvalDataset: planned under a padded-audio budget,
    dealt to the ranks in turn; a rank with one batch fewer ends with a filler batch `[-1]`."""

    def __init__(self, dataset: EvalDataset, max_batch_seconds: float, max_batch_size: int, *,
                 rank: int = 0, world_size: int = 1, length_ladder: int = 0):
        seconds = ladder_seconds(dataset.durations, length_ladder, dataset.sampling_rate)  # what each pads to
        batches = cut_sorted(seconds, max_batch_seconds, max_batch_size) if len(dataset) else []
        mine = [b.tolist() for b in batches[rank::world_size]]
        rounds = -(-len(batches) // world_size)  # ceil: every rank runs this many forwards
        self.batches = mine + [[-1]] * (rounds - len(mine))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_eval_dataloader(
    dataset: EvalDataset,
    data: DataConfig,
    *,
    feature_extractor,
    tokenizer,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    num_workers: int | None = None,
) -> DataLoader:
    """This rank's DataLoader over `dataset` (see the module docstring; not for `accelerator.prepare`).
    `batch_size` caps the utterances per batch (default `data.eval_batch_size`)."""
    collator = Collator(feature_extractor, tokenizer, data.max_text_tokens, data.sampling_rate,
                        length_ladder=data.length_ladder)
    workers = data.workers() if num_workers is None else num_workers
    sampler = EvalBatchSampler(dataset, data.eval_max_batch_audio_seconds, batch_size or data.eval_batch_size,
                               rank=rank, world_size=world_size, length_ladder=data.length_ladder)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        # Evaluated again and again with the same data: keep the workers between evaluations.
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def eval_padding_efficiency(dataset: EvalDataset, max_batch_seconds: float | None, batch_size: int) -> float:
    """Useful / padded audio of `dataset`'s evaluation batches (from metadata; None: no budget)."""
    d = dataset.durations
    batches = cut_sorted(d, max_batch_seconds, batch_size)
    padded = sum(len(b) * float(d[b].max()) for b in batches if len(b))
    return float(d.sum()) / padded if padded else 1.0

