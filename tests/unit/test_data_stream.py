"""The training stream: sharding exactly once over ranks and workers, exact resume, bad data."""

from __future__ import annotations

import json

import pytest
import torch

from emotrain.config import Config
from emotrain.data.folds import make_fold_split, read_metadata
from emotrain.data.stream import (
    StreamSettings,
    TrainStream,
    build_train_stream,
    lockstep,
    partition_shards,
    training_shards,
)
from emotrain.data.toyset import toy_processors, write_toy_prepared
from emotrain.distributed import all_ranks_true

CORRUPT = "Ses03F_impro02_F010"  # speaker Ses03F: in training for folds != 3 (validation: 1 speaker by seed)


@pytest.fixture(scope="module")
def processors():
    return toy_processors()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # 5 sessions, 3 shards each; one utterance at 8 kHz (resampled), one with corrupt bytes.
    path = tmp_path_factory.mktemp("prepared")
    return str(
        write_toy_prepared(
            path, per_session=[14, 16, 15, 17, 13], num_shards=3, corrupt_ids=[CORRUPT], rates={"Ses02F_impro01_M001": 8000}
        )
    )


@pytest.fixture(scope="module")
def meta(root):
    return read_metadata(root)


def _split(root, meta, fold=1, seed=5):
    split = make_fold_split(root, fold, validation="speakers", validation_speakers=1, seed=seed, meta=meta)
    assert CORRUPT in split.train_ids()
    return split


def _settings(batching="bucket", **kw):
    base = dict(
        seed=3,
        batch_size=4,
        batching=batching,
        max_batch_audio_seconds=2.4,
        bucket_buffer_size=10,
        shuffle_buffer_size=6,
        max_audio_seconds=0.8,  # toy utterances are 0.2-1.2 s: some get (random) crops
        random_crop=True,
        max_text_tokens=12,
    )
    base.update(kw)
    return StreamSettings(**base)


def _stream(split, processors, settings=None, **kw):
    fe, tok = processors
    return TrainStream(split, settings or _settings(), feature_extractor=fe, tokenizer=tok, **kw)


def _run(stream, epochs, stop_after=None):
    """Batches over `epochs` (the recipe's loop shape); stops after `stop_after` batches."""
    out = []
    for epoch in epochs:
        stream.set_epoch(epoch)
        for batch in stream:
            out.append((epoch, batch))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


def _same(a, b):
    (ea, ba), (eb, bb) = a, b
    assert ea == eb and ba["ids"] == bb["ids"]
    for key in ("input_values", "audio_lengths", "input_ids", "attention_mask", "labels"):
        assert torch.equal(ba[key], bb[key]), key


# ---------------------------------------------------------------------------------------------
# Sharding.


@pytest.mark.parametrize(
    "fold,num_workers,worlds",
    [(1, 0, (1, 2, 4)), (0, 0, (1, 2, 4)), (1, 2, (1, 2, 3)), (0, 3, (2, 4))],
    ids=["12-shards", "15-shards-not-divisible", "12-shards-2-workers", "15-shards-3-workers"],
)
def test_union_of_ranks_is_exactly_the_training_split(root, meta, processors, fold, num_workers, worlds):
    split = _split(root, meta, fold=fold) if fold else make_fold_split(root, 0, seed=5, meta=meta)
    expected = sorted(split.train_ids())
    for world in worlds:
        for epoch in (0, 1):
            per_rank = [
                _stream(split, processors, rank=r, world_size=world, num_workers=num_workers).epoch_ids(epoch)
                for r in range(world)
            ]
            union = [i for ids in per_rank for i in ids]
            assert sorted(union) == expected, (world, epoch)  # exactly once: no loss, no duplicate
            sizes = [len(ids) for ids in per_rank]
            assert max(sizes) - min(sizes) <= max(sizes) // 2 + 2  # roughly balanced


def test_whole_shards_per_rank_when_the_shard_count_divides_the_world(root, meta):
    split = _split(root, meta)
    shards = training_shards(split)
    assert len(shards) == 12
    for world in (1, 2, 3, 4, 6, 12):
        seen = []
        for r in range(world):
            part = partition_shards(shards, world, r)
            assert len(part) == 12 // world
            for f, rows in part:
                full = dict(shards)[f]
                assert rows.tolist() == full.tolist()  # the whole shard
                seen.append(f)
        assert sorted(seen) == [f for f, _ in shards]
    # 12 shards over 5 ranks: 10 dealt whole, the 2 smallest split row by row.
    parts = [partition_shards(shards, 5, r) for r in range(5)]
    rows = sorted(int(m) for p in parts for _, rs in p for m in rs)
    assert rows == sorted(int(m) for _, rs in shards for m in rs)


def test_streamed_batches_are_the_plan_and_cover_the_rank_split(root, meta, processors):
    split = _split(root, meta)
    world = 2
    streamed = []
    for rank in range(world):
        stream = _stream(split, processors, rank=rank, world_size=world)
        planned = stream.epoch_ids(0)
        got = [i for _, b in _run(stream, [0]) for i in b["ids"]]
        assert stream.skipped == ([CORRUPT] if CORRUPT in planned else [])
        assert got == [i for i in planned if i != CORRUPT]
        streamed += got + stream.skipped
    assert sorted(streamed) == sorted(split.train_ids())


def test_epochs_differ_and_are_seeded(root, meta, processors):
    split = _split(root, meta)
    a = _stream(split, processors)
    assert a.epoch_ids(0) != a.epoch_ids(1)
    assert sorted(a.epoch_ids(0)) == sorted(a.epoch_ids(1))
    b = _stream(split, processors, settings=_settings(seed=4))
    assert a.epoch_ids(0) != b.epoch_ids(0)
    assert a.epoch_ids(0) == _stream(split, processors).epoch_ids(0)


# ---------------------------------------------------------------------------------------------
# Exact resume.


@pytest.mark.parametrize("batching", ["bucket", "fixed"])
def test_resume_is_exact_within_and_across_epochs(root, meta, processors, batching):
    split = _split(root, meta)
    settings = _settings(batching)
    uninterrupted = _stream(split, processors, settings)
    reference = _run(uninterrupted, [0, 1])
    assert uninterrupted.skipped == [CORRUPT, CORRUPT]  # once per epoch
    n0 = sum(1 for e, _ in reference if e == 0)
    assert n0 >= 6
    for k in (1, n0 // 2, n0, n0 + 2):  # early, mid-epoch, at the epoch end, inside epoch 1
        first = _stream(split, processors, settings)
        head = _run(first, [0, 1], stop_after=k)
        state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint holds
        assert state["position"] == (k if k <= n0 else k - n0)
        resumed = _stream(split, processors, settings)
        resumed.load_state_dict(state)
        tail = _run(resumed, range(state["epoch"], 2))
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)
        assert resumed.skipped == uninterrupted.skipped  # the count survives the restart


def test_resume_is_exact_with_two_workers(root, meta, processors):
    split = _split(root, meta)
    settings = _settings()
    reference = _run(_stream(split, processors, settings, num_workers=2), [0, 1])
    # Workers change the stream (each reads its own shards) but not its content.
    flat = sorted(i for e, b in reference if e == 0 for i in b["ids"])
    assert flat == sorted(i for i in split.train_ids() if i != CORRUPT)
    n0 = sum(1 for e, _ in reference if e == 0)
    for k in (3, n0 - 1, n0 + 1):  # n0 - 1: one worker may already be exhausted
        first = _stream(split, processors, settings, num_workers=2)
        head = _run(first, [0, 1], stop_after=k)
        resumed = _stream(split, processors, settings, num_workers=2)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = _run(resumed, range(resumed.epoch, 2))
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)


def test_state_is_small_and_checked(root, meta, processors):
    split = _split(root, meta)
    stream = _stream(split, processors, rank=1, world_size=2)
    state = stream.state_dict()
    assert len(json.dumps(state)) < 1000
    with pytest.raises(ValueError, match="world_size"):
        _stream(split, processors, rank=1, world_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        _stream(split, processors, _settings(max_batch_audio_seconds=5.0), rank=1, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_workers"):
        _stream(split, processors, rank=1, world_size=2, num_workers=2).load_state_dict(state)


def test_states_round_trip_through_checkpoint_files_one_per_rank(root, meta, processors, tmp_path):
    from emotrain.train.checkpoint import read_json, stream_state_path, write_json

    split = _split(root, meta)
    streams = [_stream(split, processors, rank=r, world_size=2) for r in range(2)]
    for s in streams:
        next(iter(s))
    assert [s.position for s in streams] == [1, 1]
    paths = [stream_state_path(tmp_path, s.rank) for s in streams]
    assert len(set(paths)) == 2
    for s, path in zip(streams, paths):
        write_json(path, s.state_dict())  # JSON-serialisable as it is
    fresh = [_stream(split, processors, rank=r, world_size=2) for r in range(2)]
    for s, path in zip(fresh, paths):
        s.load_state_dict(read_json(path))
    assert [s.state_dict() for s in fresh] == [s.state_dict() for s in streams]


def test_any_fsspec_url_works(root, processors):
    import glob
    import os

    import fsspec

    fs = fsspec.filesystem("memory")
    for path in glob.glob(f"{root}/session*/*.parquet"):
        fs.pipe(f"/emotrain-test-prepared/{os.path.relpath(path, root)}", open(path, "rb").read())
    try:
        split = make_fold_split("memory://emotrain-test-prepared", 2, seed=0)
        assert all(f.startswith("memory://") for f in split.train_files)
        stream = _stream(split, processors)
        got = [i for _, b in _run(stream, [0]) for i in b["ids"]]
        assert sorted(got + stream.skipped) == sorted(split.train_ids())
    finally:
        fs.rm("/emotrain-test-prepared", recursive=True)


def test_set_epoch_semantics(root, meta, processors):
    split = _split(root, meta)
    stream = _stream(split, processors)
    n = stream.num_batches(0)
    assert len(list(stream)) == n and stream.remaining == 0
    assert list(stream) == []  # the epoch is consumed until set_epoch moves on
    stream.set_epoch(0)  # same epoch: a no-op (what the recipe does right after a resume)
    assert list(stream) == []
    stream.set_epoch(1)
    assert stream.position == 0 and stream.remaining == stream.num_batches(1)


# ---------------------------------------------------------------------------------------------
# Bad data and batch content.


def test_unreadable_shard_is_skipped_without_ending_the_epoch(tmp_path, processors):
    root = write_toy_prepared(tmp_path / "p", per_session=[6, 9, 9, 9, 9], num_shards=3)
    split = make_fold_split(str(root), 1, seed=0)
    broken = split.train_files[4]
    broken_ids = set(split.meta.id[split.meta.file == split.meta.files.index(broken)].tolist()) & set(split.train_ids())
    assert broken_ids
    with open(broken, "r+b") as handle:  # keep the footer, smash the data pages
        handle.seek(8)
        handle.write(b"\x00" * 200)
    stream = _stream(split, processors)
    got = [i for _, b in _run(stream, [0]) for i in b["ids"]]
    assert set(stream.skipped) == broken_ids
    assert sorted(got + stream.skipped) == sorted(split.train_ids())


def test_batches_respect_crop_budget_and_labels(root, meta, processors):
    split = _split(root, meta)
    settings = _settings()
    stream = _stream(split, processors, settings)
    labels = dict(zip(meta.id.tolist(), meta.label.tolist()))
    max_samples = int(settings.max_audio_seconds * settings.sampling_rate)
    batches = [b for _, b in _run(stream, [0])]
    assert any(b["audio_lengths"].max() == max_samples for b in batches)  # long ones cropped
    for b in batches:
        assert b["input_values"].shape[1] == b["audio_lengths"].max() <= max_samples
        assert len(b["ids"]) <= settings.batch_size
        assert b["padded_audio_seconds"] <= settings.max_batch_audio_seconds + 1e-6 or len(b["ids"]) == 1
        assert b["labels"].tolist() == [labels[i] for i in b["ids"]]
    # Random crops differ across epochs (seeded by epoch), identical on replay.
    again = [b for _, b in _run(_stream(split, processors, settings), [0])]
    assert all(torch.equal(a["input_values"], c["input_values"]) for a, c in zip(batches, again))


def test_build_from_config_and_lockstep_single_process(root, meta, processors):
    fe, tok = processors
    cfg = Config()
    cfg.data.path, cfg.data.bucket_buffer_size, cfg.train.batch_size = root, 16, 3
    split = _split(root, meta)
    stream = build_train_stream(cfg, split, feature_extractor=fe, tokenizer=tok)
    assert stream.settings.batch_size == 3 and stream.settings.seed == cfg.train.seed
    assert all_ranks_true(True, None) and not all_ranks_true(False, None)
    assert len(list(lockstep(iter(range(5))))) == 5
