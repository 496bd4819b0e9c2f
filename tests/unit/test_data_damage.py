"""A damaged or incomplete prepared dataset is refused in one line naming the file, wherever it is
read (the whole-dataset check before training, the fold's metadata, the evaluation rows, the data
workers), never trained or evaluated on as if it were whole."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emotrain.config import ConfigError, DataConfig, ModelConfig
from emotrain.data.evaluation import EvalDataset
from emotrain.data.folds import check_config_fits_dataset, check_prepared, make_fold_split, read_metadata
from emotrain.data.shards import (
    DATASET_FILE,
    REPORT_FILE,
    IEMOCAP_INFO,
    PreparedDataError,
    read_dataset_info,
    storage_error,
    write_dataset_info,
)
from tests.toyset import write_toy_prepared

PER_SESSION = [7, 9, 8, 10, 6]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A toy dataset as `emotrain prepare` leaves it: shards, dataset.json and the report's counts."""
    root = write_toy_prepared(tmp_path_factory.mktemp("toy") / "prepared", per_session=PER_SESSION, num_shards=3)
    write_dataset_info(root, IEMOCAP_INFO)
    counts = {f"session{s}": {"total": n} for s, n in enumerate(PER_SESSION, start=1)}
    (root / REPORT_FILE).write_text(json.dumps({"counts": counts}))
    return root


@pytest.fixture
def root(pristine, tmp_path):
    copy = tmp_path / "prepared"
    shutil.copytree(pristine, copy)
    return copy


def test_the_pristine_dataset_passes_every_check(root):
    assert check_prepared(str(root)) == IEMOCAP_INFO
    assert len(read_metadata(str(root))) == sum(PER_SESSION)


def test_a_missing_shard_is_named_with_its_group_folder(root):
    (root / "session2" / "data-00001-of-00003.parquet").unlink()
    for read in (check_prepared, read_metadata, lambda path: make_fold_split(path, 1)):
        with pytest.raises(PreparedDataError) as err:
            read(str(root))
        message = str(err.value)
        assert f"{root / 'session2'} is missing data-00001-of-00003.parquet" in message
        assert "emotrain prepare" in message and "\n" not in message


def test_a_group_folder_removed_from_a_prepared_dataset_says_it_is_incomplete(root):
    """With dataset.json (written after every group's shards) the data was prepared: not "run emotrain
    synth, then prepare", as if there were nothing."""
    shutil.rmtree(root / "session3")
    for read in (check_prepared, read_metadata, lambda path: make_fold_split(path, 1)):
        with pytest.raises(PreparedDataError) as err:
            read(str(root))
        message = str(err.value)
        assert f"{root / 'session3'} holds no shards, but {root / DATASET_FILE} lists the group session3" in message
        assert "incomplete" in message and "emotrain prepare" in message and "synth" not in message


def test_the_last_shard_missing_and_shards_of_two_preparations_are_refused(root):
    (root / "session3" / "data-00002-of-00003.parquet").unlink()
    with pytest.raises(PreparedDataError, match="missing data-00002-of-00003.parquet"):
        check_prepared(str(root))
    shutil.copy(root / "session3" / "data-00000-of-00003.parquet", root / "session3" / "data-00000-of-00004.parquet")
    with pytest.raises(PreparedDataError, match="session3 holds shards of 2 preparations"):
        check_prepared(str(root))


def test_a_copy_of_a_shard_beside_the_numbered_ones_is_refused_by_name(root):
    """`data-00000-of-00003 (1).parquet` (a file manager's copy) matches `data-*.parquet`: read, it
    would be one more shard of the group, its rows twice."""
    copy = root / "session2" / "data-00000-of-00003 (1).parquet"
    shutil.copy(root / "session2" / "data-00000-of-00003.parquet", copy)
    (root / REPORT_FILE).unlink()  # the row counts would catch it too: the name alone must
    for read in (check_prepared, read_metadata, lambda path: make_fold_split(path, 1)):
        with pytest.raises(PreparedDataError) as err:
            read(str(root))
        assert f"{copy} was not written by `emotrain prepare`" in str(err.value), str(err.value)
        assert "remove it or re-run `emotrain prepare`" in str(err.value)


def test_the_same_utterance_id_in_two_shards_names_both(root):
    from emotrain.data.folds import Metadata

    (root / REPORT_FILE).unlink()
    shards = [root / "session2" / f"data-0000{k}-of-00003.parquet" for k in (0, 1)]
    first = pq.read_table(shards[0])
    second = pq.read_table(shards[1])
    # A row of the first shard written into the second one: a valid file under the right name.
    pq.write_table(pa.concat_tables([second, first.slice(0, 1)]), shards[1])
    with pytest.raises(PreparedDataError) as err:
        make_fold_split(str(root), 1)
    message = str(err.value)
    assert "1 utterance id(s) appear more than once" in message and first["id"][0].as_py() in message
    assert f"{shards[0]} and {shards[1]}" in message and "emotrain prepare" in message and "\n" not in message
    assert f"({first['id'][0].as_py()!r} in" in message  # the id as written, not numpy's repr of it
    # Every reader of the metadata refuses it: a fold split, and `emotrain evaluate` (which reads groups).
    with pytest.raises(PreparedDataError, match="appear more than once"):
        read_metadata(str(root), (2,))
    assert isinstance(read_metadata(str(root), (1,)), Metadata)  # a group without the copy reads fine


def test_shard_footers_are_read_in_parallel_and_the_first_damaged_shard_is_named(root, monkeypatch):
    """Every rank checks every footer before training: in threads, not one request after another. Of two
    damaged shards the first by group and name is named, even when its thread ends last."""
    import threading
    import time

    from emotrain.data import shards

    damaged = [root / "session1" / "data-00002-of-00003.parquet", root / "session4" / "data-00000-of-00003.parquet"]
    for shard in damaged:
        shard.write_bytes(shard.read_bytes()[:-100])
    read, lock, active = shards.read_shard_footer, threading.Lock(), [0, 0]  # now, most at once

    def slow_read(url):
        with lock:
            active[0] += 1
            active[1] = max(active)
        try:
            time.sleep(0.3 if url == str(damaged[0]) else 0.02)
            return read(url)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(shards, "read_shard_footer", slow_read)
    with pytest.raises(PreparedDataError, match=f"cannot read the shard {damaged[0]} "):
        check_prepared(str(root))
    assert active[1] > 1


def test_a_group_with_fewer_rows_than_prepared_is_refused(root):
    shard = root / "session4" / "data-00000-of-00003.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, table.num_rows - 1), shard)  # a valid file, one row short
    for read in (check_prepared, read_metadata):
        with pytest.raises(PreparedDataError, match=f"session4 holds 9 rows .*{REPORT_FILE} counted 10"):
            read(str(root))
    (root / REPORT_FILE).unlink()  # prepared by hand, no counts: nothing to check against
    assert len(read_metadata(str(root))) == sum(PER_SESSION) - 1


def test_an_edited_label_order_in_dataset_json_is_refused_by_a_fresh_split(root):
    info = read_dataset_info(str(root))
    swapped = (info.labels[1], info.labels[0], *info.labels[2:])
    write_dataset_info(root, type(info)(**{**info.__dict__, "labels": swapped}))
    for read in (check_prepared, lambda path: make_fold_split(path, 1)):
        with pytest.raises(PreparedDataError) as err:
            read(str(root))
        assert str(root / DATASET_FILE) in str(err.value) and "was prepared with ['neutral', 'happy'" in str(err.value)


def test_a_truncated_shard_is_named_in_the_check_the_metadata_and_the_evaluation_rows(root):
    meta = read_metadata(str(root))  # read while whole: the evaluation rows are read afterwards
    shard = root / "session1" / "data-00000-of-00003.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    for read in (check_prepared, read_metadata,
                 lambda path: EvalDataset(meta, meta.id[meta.session == 1].tolist())):
        with pytest.raises(PreparedDataError) as err:
            read(str(root))
        message = str(err.value)
        assert f"cannot read the shard {shard}" in message and "ArrowInvalid" in message
        assert "emotrain prepare" in message


def test_a_shard_rewritten_after_the_metadata_was_read_is_refused_by_the_evaluation_rows(root):
    meta = read_metadata(str(root))
    shard = root / "session1" / "data-00000-of-00003.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), shard)  # the same rows, another order
    with pytest.raises(PreparedDataError) as err:
        EvalDataset(meta, meta.id[meta.session == 1].tolist())
    assert f"{shard} row " in str(err.value) and "but the dataset's metadata says" in str(err.value)
    assert "changed after it was read" in str(err.value) and "emotrain prepare" in str(err.value)


def test_a_dataset_json_that_is_not_json_names_the_file(root):
    (root / DATASET_FILE).write_text("{not json")
    with pytest.raises(PreparedDataError) as err:
        check_prepared(str(root))
    assert f"{root / DATASET_FILE} is not a dataset description (JSONDecodeError" in str(err.value)
    assert "emotrain prepare" in str(err.value)
    (root / DATASET_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(PreparedDataError, match="UnicodeDecodeError"):
        read_dataset_info(str(root))


def test_a_fold_the_data_does_not_have_is_refused_with_the_config(root):
    info = check_prepared(str(root))
    with pytest.raises(ConfigError) as err:
        check_config_fits_dataset(DataConfig(path=str(root), fold=9), ModelConfig(), info)
    assert err.value.key == "data.fold" and "is 9" in str(err.value) and "[1, 2, 3, 4, 5]" in str(err.value)
    check_config_fits_dataset(DataConfig(path=str(root), fold=0), ModelConfig(), info)


def test_the_credentials_hint_is_for_urls_only(tmp_path):
    local = storage_error(str(tmp_path / "a-file"), NotADirectoryError(20, "Not a directory"))
    assert local.key == "data.path" and "a-file" in str(local)
    assert "AWS" not in str(local) and "Credentials" not in str(local)
    remote = storage_error("s3://bucket/prefix", PermissionError("Access Denied"))
    assert "s3://bucket/prefix" in str(remote) and "AWS_ACCESS_KEY_ID" in str(remote)
