"""Validation/test data: map-style, full audio, sorted by duration, every utterance once."""

from __future__ import annotations

import numpy as np
import pytest

from emotrain.config import DataConfig
from emotrain.data.evaluation import (
    EvalDataset,
    build_eval_dataloader,
    build_eval_datasets,
    eval_padding_efficiency,
)
from emotrain.data.folds import make_fold_split
from emotrain.data.toyset import toy_processors, write_toy_prepared

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
    assert eval_padding_efficiency(test, 4) > 0.8


def test_fold_zero_has_no_test_set(split):
    zero = make_fold_split(split.meta.files[0].rsplit("/session", 1)[0], 0, meta=split.meta)
    validation, test = build_eval_datasets(zero)
    assert test is None and len(validation) == zero.num_validation
