"""Leave-one-session-out folds: test = session k, validation from training sessions only, seeded."""

from __future__ import annotations

import numpy as np
import pytest

from emotrain.config import DataConfig
from emotrain.data.folds import (
    list_session_files,
    make_fold_split,
    read_metadata,
    split_from_config,
)
from tests.toyset import write_toy_prepared


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # Odd, unequal session sizes; 3 shards per session.
    return str(write_toy_prepared(tmp_path_factory.mktemp("prepared"), per_session=[9, 12, 7, 10, 11], num_shards=3))


@pytest.fixture(scope="module")
def meta(root):
    return read_metadata(root)


def _session_of(ids):
    return {int(i[3:5]) for i in ids}


@pytest.mark.parametrize("fold", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("mode", ["speakers", "fraction"])
def test_fold_k_tests_on_session_k_and_validates_inside_training_sessions(root, meta, fold, mode):
    split = make_fold_split(root, fold, validation=mode, validation_speakers=2, validation_fraction=0.2, seed=7, meta=meta)
    assert split.test_session == fold
    assert _session_of(split.test_ids) == {fold}
    assert len(split.test_ids) == int((meta.session == fold).sum())  # the whole session
    assert split.train_sessions == tuple(s for s in range(1, 6) if s != fold)
    train, val, test = set(split.train_ids()), set(split.validation_ids), set(split.test_ids)
    assert val and train
    assert _session_of(val) <= set(split.train_sessions)
    assert _session_of(train) <= set(split.train_sessions)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(meta.id.tolist())  # nothing lost
    assert split.num_train == len(train)
    # Training files are exactly the training sessions' shards (empty ones included).
    assert list(split.train_files) == [f for s in split.train_sessions for f in list_session_files(root, s)]
    if mode == "speakers":
        assert len(split.validation_speakers) == 2
        speakers_of = dict(zip(meta.id.tolist(), meta.speaker.tolist()))
        held = set(split.validation_speakers)
        assert {speakers_of[i] for i in val} == held  # whole speakers...
        assert not any(speakers_of[i] in held for i in train)  # ...none of their utterances train
    else:
        assert split.validation_speakers == ()
        assert len(val) == round(0.2 * (len(train) + len(val)))


def test_fold_zero_has_no_test_and_trains_on_all_sessions(root, meta):
    split = make_fold_split(root, 0, validation="speakers", validation_speakers=1, seed=1, meta=meta)
    assert split.test_session is None and split.test_ids is None and split.num_test == 0
    assert split.train_sessions == (1, 2, 3, 4, 5)
    assert len(split.train_files) == 15
    assert set(split.train_ids()) | set(split.validation_ids) == set(meta.id.tolist())


def test_splits_are_deterministic_by_seed(root, meta):
    for mode in ("speakers", "fraction"):
        a = make_fold_split(root, 3, validation=mode, seed=11, meta=meta)
        b = make_fold_split(root, 3, validation=mode, seed=11)  # metadata re-read from disk
        assert a == b and a.fingerprint() == b.fingerprint()
        draws = {make_fold_split(root, 3, validation=mode, seed=s, meta=meta).validation_ids for s in range(8)}
        assert len(draws) > 1, "the seed must change the validation draw"


def test_split_from_config_and_errors(root, meta):
    cfg = DataConfig(path=root, fold=2, validation="fraction", validation_fraction=0.25)
    split = split_from_config(cfg, seed=5, meta=meta)
    assert split.test_session == 2 and split.validation_mode == "fraction"
    summary = split.summary()
    assert summary["num_train"] + summary["num_validation"] + summary["num_test"] == len(meta)
    with pytest.raises(ValueError, match="validation_speakers"):
        make_fold_split(root, 1, validation="speakers", validation_speakers=8, meta=meta)  # 8 training speakers
    with pytest.raises(FileNotFoundError):
        read_metadata(root + "/nowhere")


def test_metadata_reads_light_columns_with_positions(meta):
    assert len(meta) == 49
    # Each row knows its file and position; rows of a file are numbered 0..n-1.
    for f in range(len(meta.files)):
        rows = np.sort(meta.row[meta.file == f])
        assert rows.tolist() == list(range(len(rows)))
