"""Validation/test data: map-style, full audio, sorted by duration, every utterance once."""

from __future__ import annotations

import numpy as np
import pytest

from emotrain.config import DataConfig
from emotrain.data.evaluation import (
    FILLER_ID,
    EvalDataset,
    build_eval_dataloader,
    build_eval_datasets,
    eval_padding_efficiency,
)
from emotrain.data.folds import make_fold_split
from tests.toyset import toy_processors, write_toy_prepared

CORRUPT = "Ses01F_impro01_M003"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = write_toy_prepared(
        tmp_path_factory.mktemp("prepared"), per_session=[13, 8, 8, 8, 8], num_shards=3,
        corrupt_ids=[CORRUPT], rates={"Ses01F_impro01_F002": 22050},
    )
    return make_fold_split(str(root), 1, validation="fraction", validation_fraction=0.25, seed=0)


def test_eval_sets_are_sorted_full_length_and_complete(split):
    validation, test = build_eval_datasets(split)
    assert sorted(test.ids) == sorted(split.test_ids) and len(test) == 13
    assert sorted(validation.ids) == sorted(split.validation_ids)
    assert (np.diff(test.durations) >= 0).all()  # sorted by duration: deterministic, little padding
    durations = dict(zip(split.meta.id.tolist(), split.meta.duration.tolist()))
    for i in range(len(test)):
        item = test[i]
        assert item["id"] == test.ids[i]
        if item["valid"]:
            # Full audio, never cropped (toy utterances run up to 1.2 s), resampled to 16 kHz.
            assert abs(len(item["array"]) - durations[item["id"]] * 16000) <= 2
    assert test.skipped == [CORRUPT]
    assert validation.skipped == []


def test_eval_dataloader_yields_each_utterance_once_with_valid_flags(split):
    fe, tok = toy_processors()
    test = EvalDataset(split.meta, split.test_ids, name="test")
    loader = build_eval_dataloader(test, DataConfig(eval_batch_size=4), feature_extractor=fe, tokenizer=tok)
    ids, valid = [], []
    for batch in loader:
        assert batch["input_values"].shape[0] == len(batch["ids"]) == batch["labels"].shape[0]
        ids += batch["ids"]
        valid += batch["valid"].tolist()
    assert ids == test.ids  # the dataset's order, each once
    assert [i for i, v in zip(ids, valid) if not v] == [CORRUPT]
    assert eval_padding_efficiency(test, None, 4) > 0.8


def test_eval_batches_keep_to_the_audio_budget_and_split_over_ranks_evenly(split):
    fe, tok = toy_processors()
    test = EvalDataset(split.meta, split.test_ids, name="test")
    budget = 2.0  # padded seconds (toy utterances: 0.1-1.2 s)
    data = DataConfig(eval_batch_size=8, eval_max_batch_audio_seconds=budget)
    whole = [b for b in build_eval_dataloader(test, data, feature_extractor=fe, tokenizer=tok)]
    assert all(b["padded_audio_seconds"] <= budget + 1e-6 or len(b["ids"]) == 1 for b in whole)
    assert len({len(b["ids"]) for b in whole}) > 1  # short utterances go more to a batch than long ones
    assert eval_padding_efficiency(test, budget, 8) > eval_padding_efficiency(test, None, 8) - 1e-9
    for world in (2, 3):
        loaders = [build_eval_dataloader(test, data, feature_extractor=fe, tokenizer=tok, rank=r, world_size=world)
                   for r in range(world)]
        assert len({len(loader) for loader in loaders}) == 1  # the same number of forwards on every rank
        seen = [i for loader in loaders for b in loader for i in b["ids"] if i != FILLER_ID]
        assert sorted(seen) == sorted(test.ids)  # each utterance on exactly one rank
        fillers = [b for loader in loaders for b in loader if b["ids"] == [FILLER_ID]]
        assert len(fillers) == world * len(loaders[0]) - len(whole) and all(not b["valid"].any() for b in fillers)


def test_with_a_length_ladder_eval_batches_are_padded_to_rungs_within_the_budget(split):
    from emotrain.data.batching import ladder_length

    fe, tok = toy_processors()
    test = EvalDataset(split.meta, split.test_ids, name="test")
    budget = 2.0
    data = DataConfig(eval_batch_size=8, eval_max_batch_audio_seconds=budget, length_ladder=2)
    batches = list(build_eval_dataloader(test, data, feature_extractor=fe, tokenizer=tok))
    for b in batches:
        samples = b["input_values"].shape[1]
        assert samples == ladder_length(int(b["audio_lengths"].max()), 320, 2)  # a rung of the ladder
        # The budget counts what a batch pads to, the rung, not its longest utterance.
        assert b["padded_audio_seconds"] <= budget + 1e-6 or len(b["ids"]) == 1
    assert sorted(i for b in batches for i in b["ids"]) == sorted(test.ids)


def test_fold_zero_has_no_test_set(split):
    zero = make_fold_split(split.meta.files[0].rsplit("/session", 1)[0], 0, meta=split.meta)
    validation, test = build_eval_datasets(zero)
    assert test is None and len(validation) == zero.num_validation
