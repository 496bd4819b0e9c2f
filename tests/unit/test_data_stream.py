"""The training stream: the epoch plan (sharding once, equal steps on every rank, step sizes), exact
resume (also onto another number of processes or workers), and bad data."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import emotrain.data.shards as shard_layout
from emotrain.config import Config
from emotrain.data.batching import ladder_length
from emotrain.data.folds import make_fold_split, read_metadata
from emotrain.data.plan import (
    EpochPlan,
    StreamSettings,
    even_out,
    partition_shards,
    plan_epoch,
    split_largest_batches,
    step_utterances,
    training_shards,
)
from emotrain.data.reader import StreamMismatchError
from emotrain.data.shards import PreparedDataError
from emotrain.data.stream import TrainStream, build_train_stream
from tests.toyset import toy_processors, write_toy_prepared

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
    for key in ("input_values", "audio_lengths", "input_ids", "attention_mask", "labels", "valid"):
        assert torch.equal(ba[key], bb[key]), key


def _plan_ids(split, plan: EpochPlan, stop=None) -> list[str]:
    return [str(i) for i in split.meta.id[plan.rows(stop)]]


def _reload(states):
    return [json.loads(json.dumps(s)) for s in states]  # what the checkpoint files hold


# ---------------------------------------------------------------------------------------------
# The plan: sharding, equal steps, step sizes.


@pytest.mark.parametrize(
    "fold,worlds,accumulation",
    [(1, (1, 2, 3, 4), 1), (0, (1, 2, 4), 2), (0, (2, 4), 3)],
    ids=["12-shards", "15-shards-not-divisible-accum-2", "15-shards-accum-3"],
)
def test_every_rank_gets_the_same_steps_and_the_epoch_is_every_utterance_once(root, meta, fold, worlds, accumulation):
    split = _split(root, meta, fold=fold) if fold else make_fold_split(root, 0, seed=5, meta=meta)
    expected = sorted(split.train_ids())
    for world in worlds:
        for epoch in (0, 1):
            plans = plan_epoch(split, _settings(), world, epoch=epoch, accumulation=accumulation)
            lengths = {len(p) for p in plans}
            assert len(lengths) == 1 and lengths.pop() % accumulation == 0, [len(p) for p in plans]
            union = [i for p in plans for i in _plan_ids(split, p)]
            assert sorted(union) == expected, (world, epoch)  # exactly once: nothing dropped, no duplicate
            assert all(p.dropped == 0 for p in plans)
            sizes = step_utterances(plans, accumulation)
            assert len(sizes) == len(plans[0]) // accumulation and sizes.sum() == len(expected)
            # Planned batches respect the budget and the size cap (splitting only makes them smaller).
            seconds = np.minimum(split.meta.duration, _settings().max_audio_seconds)
            for p in plans:
                for pos in range(len(p)):
                    b = p.batch(pos)
                    assert 1 <= len(b) <= 4
                    assert len(b) * seconds[b].max() <= 2.4 + 1e-9 or len(b) == 1


def test_ranks_with_fewer_batches_split_their_largest_batches():
    def plan(*sizes):
        rows = iter(range(1000))
        return EpochPlan(epoch=0, shards=[], batches=[np.array([next(rows) for _ in range(n)]) for n in sizes])

    short, long_ = plan(8, 2), plan(3, 3, 3, 3, 1)
    evened = even_out([short, long_], accumulation=2)
    assert [len(p) for p in evened] == [6, 6]  # 5 batches rounded up to a multiple of 2
    assert evened[0].batch_sizes().tolist() == [2, 2, 2, 1, 1, 2]  # the 8 cut into 5 (largest pieces first)
    assert evened[1].batch_sizes().tolist() == [2, 1, 3, 3, 3, 1]  # one extra batch: the first 3 is cut
    assert sorted(evened[0].rows().tolist()) == sorted(short.rows().tolist())  # same utterances, same order
    assert evened[0].rows().tolist() == short.rows().tolist()
    assert step_utterances(evened, 2).tolist() == [7, 9, 7]
    # A rank holding fewer utterances than the others have batches: the others give up their last ones.
    tiny = plan(1, 1)
    evened = even_out([tiny, long_], accumulation=1)
    assert [len(p) for p in evened] == [2, 2] and evened[1].dropped == 3 + 3 + 1
    with pytest.raises(ValueError, match="cannot fill"):
        split_largest_batches(tiny, 1)


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


def test_streamed_batches_are_the_plan_and_a_bad_utterance_stands_in(root, meta, processors):
    split = _split(root, meta)
    world = 2
    streamed = []
    for rank in range(world):
        stream = _stream(split, processors, rank=rank, world_size=world)
        planned = _plan_ids(split, stream.plan(0))
        batches = [b for _, b in _run(stream, [0])]
        assert len(batches) == stream.num_batches(0)  # every planned batch, the bad one's too
        got = [i for b in batches for i in b["ids"]]
        assert got == planned
        invalid = [i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if not ok]
        assert invalid == stream.skipped == ([CORRUPT] if CORRUPT in planned else [])
        streamed += got
    assert sorted(streamed) == sorted(split.train_ids())


def test_epochs_differ_and_are_seeded(root, meta, processors):
    split = _split(root, meta)
    a = _stream(split, processors)
    assert _plan_ids(split, a.plan(0)) != _plan_ids(split, a.plan(1))
    assert sorted(_plan_ids(split, a.plan(0))) == sorted(_plan_ids(split, a.plan(1)))
    b = _stream(split, processors, settings=_settings(seed=4))
    assert _plan_ids(split, a.plan(0)) != _plan_ids(split, b.plan(0))
    assert _plan_ids(split, a.plan(0)) == _plan_ids(split, _stream(split, processors).plan(0))


def test_random_crops_differ_across_epochs_and_replay_identically(root, meta, processors):
    split = _split(root, meta)
    settings = _settings()
    first = {e: {i: b["input_values"][k, : b["audio_lengths"][k]] for _, b in _run(_stream(split, processors, settings), [e])
                 for k, i in enumerate(b["ids"])} for e in (0, 1)}
    long_ids = [i for i in first[0] if float(meta.duration[list(meta.id).index(i)]) > settings.max_audio_seconds + 0.1]
    assert len(long_ids) >= 5
    differ = sum(not torch.equal(first[0][i], first[1][i]) for i in long_ids)
    assert differ >= len(long_ids) - 1, differ  # another window in another epoch (rarely the same by chance)
    again = {i: b["input_values"][k, : b["audio_lengths"][k]] for _, b in _run(_stream(split, processors, settings), [0])
             for k, i in enumerate(b["ids"])}
    assert all(torch.equal(first[0][i], again[i]) for i in first[0])  # ... and the same on replay


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
        resumed.load_state_dicts([state])
        tail = _run(resumed, range(state["epoch"], 2))
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)
        assert resumed.skipped == uninterrupted.skipped  # the count survives the restart


def test_resume_is_exact_with_two_workers(root, meta, processors):
    split = _split(root, meta)
    settings = _settings()
    reference = _run(_stream(split, processors, settings, num_workers=2), [0, 1])
    flat = sorted(i for e, b in reference if e == 0 for i in b["ids"])
    assert flat == sorted(split.train_ids())
    n0 = sum(1 for e, _ in reference if e == 0)
    for k in (3, n0 - 1, n0 + 1):  # n0 - 1: one worker may already be exhausted
        first = _stream(split, processors, settings, num_workers=2)
        head = _run(first, [0, 1], stop_after=k)
        resumed = _stream(split, processors, settings, num_workers=2)
        resumed.load_state_dicts(_reload([first.state_dict()]))
        tail = _run(resumed, range(resumed.epoch, 2))
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_the_worker_count_changes_no_batch_and_a_resume_with_another_count_is_exact(root, meta, processors):
    """num_workers 0, 1, 2 or 3: the same plan on every rank (batches in order, steps, step sizes) and
    the same batches streamed, for a whole epoch and for one resumed mid-way from a state saved with
    another worker count (the same plan, continued at the saved batch): the workers only share out
    the decoding of the rank's batches (data.num_workers is result-neutral and decided per machine)."""
    split = _split(root, meta)
    settings = _settings()
    accumulation = 2

    def plan_of(num_workers, world):
        streams = [_stream(split, processors, settings, rank=r, world_size=world, num_workers=num_workers,
                           accumulation=accumulation) for r in range(world)]
        return ([_plan_ids(split, s.plan()) for s in streams], [[len(s.plan().batch(p)) for p in range(s.num_batches())]
                for s in streams], streams[0].steps_in_epoch(), streams[0].step_utterances().tolist())

    for world in (1, 2, 3):
        expected = plan_of(0, world)
        for num_workers in (1, 2, 3):
            assert plan_of(num_workers, world) == expected, (world, num_workers)

    reference = _run(_stream(split, processors, settings, accumulation=accumulation), [0, 1])
    n0 = sum(1 for e, _ in reference if e == 0)
    for num_workers, stop_after, resume_workers in ((1, n0 // 2, 3), (2, 3, 0), (3, n0 + 3, 2)):
        streamed = _run(_stream(split, processors, settings, num_workers=num_workers, accumulation=accumulation),
                        [0, 1])
        assert len(streamed) == len(reference)
        for a, b in zip(streamed, reference):
            _same(a, b)
        first = _stream(split, processors, settings, num_workers=num_workers, accumulation=accumulation)
        head = _run(first, [0, 1], stop_after=stop_after)
        first.close()
        resumed = _stream(split, processors, settings, num_workers=resume_workers, accumulation=accumulation)
        resumed.load_state_dicts(_reload([first.state_dict()]))
        assert resumed.position == first.position and resumed.consumed is None  # the same plan, not a re-plan
        tail = _run(resumed, range(resumed.epoch, 2))
        resumed.close()
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)


def test_shards_of_many_row_groups_stream_the_plan_in_process_and_in_workers(tmp_path, processors, monkeypatch):
    """Each worker reads the row groups holding rows of its batches (real shards hold 64 rows a group;
    the toy shards above hold one group): the batches are the plan's, with and without workers, also
    resumed mid-epoch."""
    monkeypatch.setattr(shard_layout, "ROW_GROUP_SIZE", 2)
    root = write_toy_prepared(tmp_path / "p", per_session=[9, 11, 10, 12, 9], num_shards=1)
    split = make_fold_split(str(root), 1, seed=0)
    assert min(pq.ParquetFile(f).num_row_groups for f in split.train_files) >= 4
    reference = _run(_stream(split, processors), [0, 1])
    planned = [_plan_ids(split, _stream(split, processors).plan(e)) for e in (0, 1)]
    assert [[i for e, b in reference if e == epoch for i in b["ids"]] for epoch in (0, 1)] == planned
    assert all(b["valid"].all() for _, b in reference)
    for num_workers in (0, 2):
        first = _stream(split, processors, num_workers=num_workers)
        head = _run(first, [0, 1], stop_after=3)
        first.close()
        resumed = _stream(split, processors, num_workers=2 - num_workers)
        resumed.load_state_dicts(_reload([first.state_dict()]))
        tail = _run(resumed, [0, 1])
        resumed.close()
        assert len(head) + len(tail) == len(reference)
        for a, b in zip(head + tail, reference):
            _same(a, b)


def _worker_pids() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_data_workers_persist_across_epochs_and_each_epoch_is_its_own(root, meta, processors):
    split = _split(root, meta)
    settings = _settings()
    before = _worker_pids()
    stream = _stream(split, processors, settings, num_workers=2)
    epochs = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        epochs.append(list(stream))
        workers = _worker_pids() - before
        assert len(workers) == 2, f"epoch {epoch}: {len(workers)} worker processes alive after the epoch"
        if epoch == 0:
            first_workers = workers
        assert workers == first_workers, "the workers were restarted for a new epoch"
    # Each epoch of the persistent workers is that epoch's plan: what a stream started at it yields.
    for epoch in (1, 2):
        fresh = _stream(split, processors, settings, num_workers=2)
        fresh.set_epoch(epoch)
        for a, b in zip(epochs[epoch], list(fresh), strict=True):
            _same((epoch, a), (epoch, b))
        fresh.close()
        assert [i for b in epochs[epoch] for i in b["ids"]] == _plan_ids(split, fresh.plan())
    assert epochs[1][0]["ids"] != epochs[2][0]["ids"]
    stream.close()
    assert not (_worker_pids() - before) & first_workers


@pytest.mark.parametrize(
    "old,new",
    [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 0), (3, 2)), ((3, 1), (2, 1))],
    ids=["2-to-1", "1-to-2", "2-to-3-with-workers", "3-to-2-then-again"],
)
def test_resume_on_another_number_of_processes_sees_the_rest_of_the_epoch_exactly_once(
    root, meta, processors, old, new
):
    """Stopped mid-epoch on `old` = (ranks, workers), resumed on `new`: the union of what the old
    ranks trained on and what the new ranks train on in that epoch is the epoch's set, exactly once;
    the next epoch is the new world size's own plan."""
    split = _split(root, meta)
    accumulation = 2
    old_world, old_workers = old
    streams = [_stream(split, processors, rank=r, world_size=old_world, num_workers=old_workers,
                       accumulation=accumulation) for r in range(old_world)]
    steps_taken = streams[0].steps_in_epoch() // 2
    seen = []
    for s in streams:
        batches = iter(s)
        for _ in range(steps_taken * accumulation):
            seen += next(batches)["ids"]
        batches.close()
    states = _reload([s.state_dict() for s in streams])
    assert {s["position"] for s in states} == {steps_taken * accumulation}

    new_world, new_workers = new
    resumed = [_stream(split, processors, rank=r, world_size=new_world, num_workers=new_workers,
                       accumulation=accumulation) for r in range(new_world)]
    for s in resumed:
        s.load_state_dicts(states)
    assert len({s.num_batches() for s in resumed}) == 1 and resumed[0].num_batches() % accumulation == 0
    rest = [i for s in resumed for _, b in _run(s, [0]) for i in b["ids"]]
    counts = Counter(seen + rest)
    assert sorted(counts) == sorted(split.train_ids()) and set(counts.values()) == {1}, counts.most_common(3)
    assert sum(resumed[0].step_utterances(0)) == len(rest)  # the loss's denominators cover the rest exactly
    # Skipped ids are carried over once in total (rank 0 holds the old ranks' lists).
    old_skipped = [i for s in states for i in s["skipped"]]
    assert [i for s in resumed for i in s.skipped] == old_skipped + [CORRUPT] * (CORRUPT in rest)

    # A second resize inside the same epoch still sees each utterance once.
    if old == (3, 1):
        mid = []
        for s in resumed:  # replay the first half of the new plan, then stop again
            s.load_state_dicts(states)
            batches = iter(s)
            for _ in range(accumulation):
                mid += next(batches)["ids"]
            batches.close()
        again = [_stream(split, processors, rank=0, world_size=1, accumulation=accumulation)]
        again[0].load_state_dicts(_reload([s.state_dict() for s in resumed]))
        last = [i for _, b in _run(again[0], [0]) for i in b["ids"]]
        counts = Counter(seen + mid + last)
        assert sorted(counts) == sorted(split.train_ids()) and set(counts.values()) == {1}

    # The next epoch is planned for the new world size, from all training utterances.
    for s in resumed:
        s.set_epoch(1)
        assert s.consumed is None
    fresh = plan_epoch(split, _settings(), new_world, epoch=1, accumulation=accumulation)
    assert [_plan_ids(split, s.plan()) for s in resumed] == [_plan_ids(split, p) for p in fresh]
    # ... and what the (persistent) workers stream in it is that plan: the resumed epoch's
    # excluded rows do not leak into the next one.
    streamed = [[i for b in s for i in b["ids"]] for s in resumed]
    assert streamed == [_plan_ids(split, p) for p in fresh]
    for s in resumed:
        s.close()


def test_a_resume_state_names_what_changed(root, meta, processors, tmp_path):
    split = _split(root, meta)
    stream = _stream(split, processors, rank=1, world_size=2)
    states = _reload([_stream(split, processors, rank=r, world_size=2).state_dict() for r in range(2)])
    assert len(json.dumps(states[1])) < 1000  # small (no consumed mask on a plain run)

    with pytest.raises(ValueError, match=r"data.max_batch_audio_seconds 2.4 -> 5.0"):
        _stream(split, processors, _settings(max_batch_audio_seconds=5.0), rank=1, world_size=2).load_state_dicts(states)
    with pytest.raises(ValueError, match=r"train.seed 3 -> 4"):
        _stream(split, processors, _settings(seed=4)).load_state_dicts(states)
    other_split = make_fold_split(root, 2, seed=5, meta=meta)
    with pytest.raises(ValueError, match="split"):
        _stream(other_split, processors).load_state_dicts(states)
    reordered = [{**state, "layout": {**state["layout"], "rows": "fedcba9876543210"}} for state in states]
    with pytest.raises(ValueError, match=r"the same files hold other rows \(or rows in another order\)"):
        stream.load_state_dicts(reordered)  # re-prepared into the same shard names, rows shuffled
    retimed = [{**state, "layout": {**state["layout"], "durations": "0123456789abcdef"}} for state in states]
    with pytest.raises(ValueError, match="other durations"):  # the plan buckets by duration
        stream.load_state_dicts(retimed)
    with pytest.raises(ValueError, match="one per rank"):
        stream.load_state_dicts(states[:1])
    with pytest.raises(ValueError, match="format"):
        stream.load_state_dicts([{**states[0], "format": "emotrain.train_stream/1"}, states[1]])
    # Written when each data worker planned its own shards: with one worker that plan is today's
    # (the same seed), so it resumes; with more it cannot be replayed.
    one_worker = [{**state, "format": "emotrain.train_stream/2", "num_workers": 1} for state in states]
    stream.load_state_dicts(one_worker)
    with pytest.raises(ValueError, match=r"depended on data.num_workers \(2 then\): epoch 0 cannot be resumed"):
        stream.load_state_dicts([{**state, "num_workers": 2} for state in one_worker])

    # The same utterances re-prepared into another shard layout (the README's advice for many
    # ranks): the ids still match, the files and rows do not.
    reprepared = write_toy_prepared(tmp_path / "re", per_session=[14, 16, 15, 17, 13], num_shards=4,
                                    corrupt_ids=[CORRUPT], rates={"Ses02F_impro01_M001": 8000})
    re_split = make_fold_split(str(reprepared), 1, validation="speakers", validation_speakers=1, seed=5)
    assert re_split.fingerprint() == split.fingerprint()
    with pytest.raises(ValueError, match=r"re-written since the checkpoint \(15 shard files then, 20 now\)"):
        _stream(re_split, processors).load_state_dicts(states)


def test_set_epoch_semantics(root, meta, processors):
    split = _split(root, meta)
    stream = _stream(split, processors)
    n = stream.num_batches(0)
    assert len(list(stream)) == n and stream.position == n
    assert list(stream) == []  # the epoch is consumed until set_epoch moves on
    stream.set_epoch(0)  # same epoch: a no-op (what the recipe does right after a resume)
    assert list(stream) == []
    stream.set_epoch(1)
    assert stream.position == 0 and stream.steps_done == 0


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
        assert sorted(got) == sorted(split.train_ids())
        # The layout fingerprint names files inside the dataset, so a local copy resumes a remote run.
        local = _stream(make_fold_split(root, 2, seed=0), processors)
        local.load_state_dicts(_reload([stream.state_dict()]))
    finally:
        fs.rm("/emotrain-test-prepared", recursive=True)


# ---------------------------------------------------------------------------------------------
# Bad data and batch content.


def test_unreadable_shard_stands_in_without_ending_the_epoch(tmp_path, processors):
    root = write_toy_prepared(tmp_path / "p", per_session=[6, 9, 9, 9, 9], num_shards=3)
    split = make_fold_split(str(root), 1, seed=0)
    broken = split.train_files[4]
    broken_ids = set(split.meta.id[split.meta.file == split.meta.files.index(broken)].tolist()) & set(split.train_ids())
    assert broken_ids
    with open(broken, "r+b") as handle:  # keep the footer, smash the data pages
        handle.seek(8)
        handle.write(b"\x00" * 200)
    stream = _stream(split, processors)
    batches = [b for _, b in _run(stream, [0])]
    assert len(batches) == stream.num_batches(0)
    invalid = {i for b in batches for i, ok in zip(b["ids"], b["valid"].tolist()) if not ok}
    assert set(stream.skipped) == invalid == broken_ids
    assert sorted(i for b in batches for i in b["ids"]) == sorted(split.train_ids())


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_that_no_longer_match_the_split_stop_the_stream_in_one_line(root, meta, processors, workers):
    """The shards changed under a running split (another preparation): refused, and from a data worker
    too as the one-line error it is, not torch's copy carrying the worker's traceback."""
    split = _split(root, meta)
    shifted = np.roll(split.meta.id, 1)  # every row now "is" its neighbour's id
    moved = dataclasses.replace(split, meta=dataclasses.replace(split.meta, id=shifted))
    stream = _stream(moved, processors, num_workers=workers)
    with pytest.raises(StreamMismatchError) as err:
        _run(stream, [0])
    message = str(err.value)
    assert "the prepared dataset changed after the split was read" in message
    assert "\n" not in message and "Traceback" not in message
    assert isinstance(err.value, PreparedDataError)  # what the CLI prints as one line


@pytest.mark.parametrize("ladder", [0, 4])
def test_batches_respect_crop_budget_and_labels(root, meta, processors, ladder):
    split = _split(root, meta)
    settings = _settings(length_ladder=ladder)
    stream = _stream(split, processors, settings)
    labels = dict(zip(meta.id.tolist(), meta.label.tolist()))
    max_samples = int(settings.max_audio_seconds * settings.sampling_rate)
    batches = [b for _, b in _run(stream, [0])]
    assert any(b["audio_lengths"].max() == max_samples for b in batches)  # long ones cropped
    for b in batches:
        longest = int(b["audio_lengths"].max())
        assert b["input_values"].shape[1] == ladder_length(longest, 320, ladder, max_samples) <= max_samples
        assert len(b["ids"]) <= settings.batch_size
        assert b["padded_audio_seconds"] <= settings.max_batch_audio_seconds + 1e-6 or len(b["ids"]) == 1
        assert b["labels"].tolist() == [labels[i] for i in b["ids"]]


def test_build_from_config(root, meta, processors):
    fe, tok = processors
    cfg = Config()
    cfg.data.path, cfg.data.bucket_buffer_size, cfg.train.batch_size = root, 16, 3
    cfg.train.gradient_accumulation_steps = 2
    split = _split(root, meta)
    stream = build_train_stream(cfg, split, feature_extractor=fe, tokenizer=tok)
    assert stream.settings.batch_size == 3 and stream.settings.seed == cfg.train.seed
    assert stream.accumulation == 2 and stream.num_batches() % 2 == 0


@pytest.mark.parametrize("old_world,new_world,accumulation", [(1, 2, 1), (2, 3, 1), (1, 4, 2), (2, 8, 1)])
def test_a_resize_late_in_the_epoch_plans_the_few_utterances_left(tmp_path, processors, old_world, new_world,
                                                                   accumulation):
    """Stopped three steps before the epoch's end, resumed on more ranks: what is left is dealt by rows
    (used-up shards would leave a rank nothing), so each utterance is still seen once; only when
    fewer utterances are left than the new ranks need for one step are they dropped, and counted.
    One shard per session: late in an epoch most shards are used up."""
    root = write_toy_prepared(tmp_path / "p", per_session=[12, 30, 30, 30, 30], num_shards=1)
    split = make_fold_split(str(root), 1, seed=0)
    streams = [_stream(split, processors, rank=r, world_size=old_world, accumulation=accumulation)
               for r in range(old_world)]
    steps = streams[0].steps_in_epoch()
    seen = []
    for s in streams:
        batches = iter(s)
        for _ in range((steps - 3) * accumulation):
            seen += next(batches)["ids"]
        batches.close()
    states = _reload([s.state_dict() for s in streams])
    left = len(split.train_ids()) - len(seen)
    resumed = [_stream(split, processors, rank=r, world_size=new_world, accumulation=accumulation)
               for r in range(new_world)]
    for s in resumed:
        s.load_state_dicts(states)
    rest = [i for s in resumed for _, b in _run(s, [0]) for i in b["ids"]]
    dropped = sum(p.dropped for p in resumed[0].plans())
    counts = Counter(seen + rest)
    assert set(counts.values()) == {1} and len(counts) + dropped == len(split.train_ids())
    if left >= new_world * accumulation * 2:  # enough for a step on every rank: nothing may be lost
        assert dropped == 0 and len(rest) == left, (left, dropped)


def test_an_abandoned_pass_does_not_stop_the_workers_of_the_next(root, meta, processors):
    split = _split(root, meta)
    stream = _stream(split, processors, num_workers=2)
    abandoned = iter(stream)
    next(abandoned)  # a pass left mid-way, still referenced
    reference = _stream(split, processors, num_workers=2)
    reference.load_state_dicts(_reload([stream.state_dict()]))
    expected = [b["ids"] for b in reference]
    current = iter(stream)  # a new pass over the rest of the epoch
    got = [next(current)["ids"]]
    del abandoned  # collected now: its cleanup must leave the current pass's workers alone
    got += [b["ids"] for b in current]
    assert got == expected
    stream.close()
    reference.close()


def test_a_resume_on_relabelled_data_is_refused(root, meta, processors, tmp_path):
    split = _split(root, meta)
    stream = _stream(split, processors)
    _run(stream, [0], stop_after=2)
    state = _reload([stream.state_dict()])
    relabelled = dataclasses.replace(split, label_names=tuple(reversed(split.label_names)))
    with pytest.raises(ValueError, match="re-labelled.*label set was"):
        _stream(relabelled, processors).load_state_dicts(state)
    other_rows = dataclasses.replace(split, meta=dataclasses.replace(split.meta, label=(split.meta.label + 1) % 4))
    with pytest.raises(ValueError, match="re-labelled.*the same rows have other labels"):
        _stream(other_rows, processors).load_state_dicts(state)
    older = [{k: v for k, v in state[0].items() if k != "labels"}]  # saved before label sets came from the data
    older[0]["settings"].pop("length_ladder")  # ... and before the length ladder: its default plans as before
    resumed = _stream(split, processors)
    resumed.load_state_dicts(older)
    assert resumed.position == 2


# ---------------------------------------------------------------------------------------------
# Counting a run's steps: lazily, epoch by epoch.


class _CountingStream:
    """A stream's step counts per epoch (any per-epoch function), counting the plans it is asked for."""

    def __init__(self, steps_of, epoch=0, steps_done=0):
        self.steps_of, self.epoch, self.steps_done, self.planned = steps_of, epoch, steps_done, []

    def steps_in_epoch(self, epoch=None):
        epoch = self.epoch if epoch is None else epoch
        self.planned.append(epoch)
        return self.steps_of(epoch)


@pytest.mark.parametrize("max_epochs,max_steps_left,epoch,done", [
    (1, None, 0, 0), (10, None, 0, 0), (10, None, 3, 2), (10, 7, 0, 0), (10, 1000, 0, 0), (10, 26, 0, 5),
    (100, None, 40, 1), (101, None, 0, 0), (3, None, 5, 0),
])
def test_steps_ahead_is_the_exact_sum_of_the_plans_for_normal_runs(max_epochs, max_steps_left, epoch, done):
    from emotrain.data.stream import steps_ahead

    steps_of = lambda e: 5 + (e * 7) % 3  # noqa: E731  (bucketing: epochs differ a little)
    stream = _CountingStream(steps_of, epoch, done)
    total = ((steps_of(epoch) - done if epoch < max_epochs else 0)
             + sum(steps_of(e) for e in range(epoch + 1, max_epochs)))
    expected = min(total, max_steps_left) if max_steps_left is not None else total
    assert steps_ahead(stream, max_epochs=max_epochs, max_steps_left=max_steps_left) == (expected, True)


def test_steps_ahead_of_a_huge_max_epochs_plans_only_what_it_needs():
    from emotrain.data.stream import COUNTED_EPOCHS, steps_ahead

    # Bounded by max_steps: planned epoch by epoch until the bound is reached (one per 5 steps here).
    stream = _CountingStream(lambda e: 5)
    assert steps_ahead(stream, max_epochs=10**29, max_steps_left=12) == (12, True)
    assert stream.planned == [0, 1, 2]
    # Not bounded: COUNTED_EPOCHS plans, then their mean times the epochs left (an estimate, said so).
    stream = _CountingStream(lambda e: 4 + e % 2)
    steps, exact = steps_ahead(stream, max_epochs=10**29, max_steps_left=None)
    assert not exact and len(stream.planned) == COUNTED_EPOCHS + 1 and steps == pytest.approx(4.5 * 10**29, rel=1e-6)
    # ... and under a max_steps the extrapolation passes, the bound holds but is an estimate too.
    stream = _CountingStream(lambda e: 1)
    assert steps_ahead(stream, max_epochs=10**29, max_steps_left=10**6) == (10**6, False)
    assert len(stream.planned) == COUNTED_EPOCHS + 1
