"""Prepared data on object storage, against a real S3 server (moto, started here on 127.0.0.1):
shards written to `s3://...` read back exactly as the same shards on local disk (metadata, fold
split, resume fingerprints, evaluation rows, the training stream in DataLoader workers), stale
shards replaced, the prepare report found, and data URLs carrying credentials refused."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fsspec.core import url_to_fs

from emotrain.cli import main
from emotrain.config import ConfigError, load_config
from emotrain.data.evaluation import EvalDataset
from emotrain.data.folds import check_prepared, make_fold_split, read_metadata
from emotrain.data.plan import StreamSettings
from emotrain.data.prepare import prepare
from emotrain.data.shards import PreparedDataError, join, list_shard_files, read_prepare_report, write_session_shards, write_text
from emotrain.data.state import layout_fingerprint
from emotrain.data.stream import TrainStream
from tests.s3_server import running_s3_server
from tests.toyset import toy_examples, toy_processors, write_toy_prepared

PER_SESSION = [9, 11, 10, 12, 8]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def both(s3, tmp_path_factory):
    """The same toy dataset written twice by `write_session_shards`: (local folder, s3:// URL)."""
    local = str(write_toy_prepared(tmp_path_factory.mktemp("local"), per_session=PER_SESSION, num_shards=3))
    remote = write_toy_prepared(s3.url("toy"), per_session=PER_SESSION, num_shards=3)
    return local, remote


def test_shards_on_s3_read_back_as_the_same_dataset_as_on_local_disk(s3, both):
    local, remote = both
    assert remote == f"s3://{s3.bucket}/toy"
    for session in range(1, 6):
        urls = list_shard_files(remote, f"session{session}")
        assert urls == [f"{remote}/session{session}/data-{i:05d}-of-00003.parquet" for i in range(3)]
    check_prepared(remote)
    a, b = read_metadata(local), read_metadata(remote)
    assert all(url.startswith(f"s3://{s3.bucket}/toy/session") for url in b.files)
    for column in ("id", "session", "speaker", "label", "duration", "file", "row"):
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    # The same split and the same resume fingerprint: a run may move between a copy on disk and
    # the bucket (data.path is result-neutral) and still resume exactly.
    assert make_fold_split(local, 2, meta=a).fingerprint() == make_fold_split(remote, 2, meta=b).fingerprint()
    assert layout_fingerprint(a) == layout_fingerprint(b)
    # Evaluation rows (ids, labels, text, the encoded audio bytes) straight from the bucket.
    ids = a.id[a.session == 1].tolist()
    local_rows, remote_rows = EvalDataset(a, ids), EvalDataset(b, ids)
    assert remote_rows.ids == local_rows.ids and remote_rows.texts == local_rows.texts
    assert np.array_equal(remote_rows.labels, local_rows.labels) and remote_rows.audio.equals(local_rows.audio)


def test_the_training_stream_reads_s3_in_dataloader_workers_as_it_reads_local_shards(s3, both):
    """Two forked workers, each reading the row groups of its batches from the bucket, after the parent
    process already used the S3 filesystem (metadata): the same batches as from local disk."""
    fe, tok = toy_processors()
    settings = StreamSettings(seed=3, batch_size=4, batching="bucket", max_batch_audio_seconds=2.4, bucket_buffer_size=10,
                              shuffle_buffer_size=6, max_audio_seconds=0.8, random_crop=True, max_text_tokens=12)
    batches = {}
    for name, root in zip(("local", "s3"), both):
        split = make_fold_split(root, 1, seed=5)
        if name == "s3":  # the stream has nothing but the bucket to read from
            assert all(url.startswith(f"s3://{s3.bucket}/") for url in split.train_files)
        stream = TrainStream(split, settings, feature_extractor=fe, tokenizer=tok, num_workers=2)
        batches[name] = list(stream)
        # (a shard that cannot be read would stand in as silence and be listed in `skipped`)
        assert len(batches[name]) == stream.num_batches() > 4 and not stream.skipped
    for local_batch, remote_batch in zip(batches["local"], batches["s3"], strict=True):
        assert local_batch["ids"] == remote_batch["ids"]
        for key in ("input_values", "audio_lengths", "input_ids", "attention_mask", "labels", "valid"):
            assert torch.equal(local_batch[key], remote_batch[key]), key


def test_rewriting_a_session_on_s3_with_fewer_shards_removes_the_stale_ones(s3):
    root = s3.url("rewritten")
    rng = np.random.default_rng(0)
    examples = toy_examples(1, 6, rng, "short", "FLAC", [], None)
    write_session_shards(examples, root, 1, num_shards=4)
    written = write_session_shards(examples, root, 1, num_shards=2)
    assert list_shard_files(root, "session1") == written == [f"{root}/session1/data-0000{i}-of-00002.parquet" for i in (0, 1)]


def test_a_missing_or_truncated_shard_on_s3_is_named_by_its_url(s3):
    root = write_toy_prepared(s3.url("damaged"), per_session=4, num_shards=2)
    check_prepared(root)
    fs, _ = url_to_fs(root)
    shard = f"{root}/session2/data-00001-of-00002.parquet"
    data = fs.cat_file(shard)
    fs.rm(shard)
    with pytest.raises(PreparedDataError, match=f"{root}/session2 is missing data-00001-of-00002.parquet"):
        check_prepared(root)
    fs.pipe_file(shard, data[:-50])
    with pytest.raises(PreparedDataError, match=f"cannot read the shard {shard} .*emotrain prepare"):
        read_metadata(root)


def test_the_prepare_report_is_written_to_and_read_from_s3_and_the_report_counts_it(s3, tmp_path):
    from emotrain.report import counts_table

    root = s3.url("with-report")
    assert read_prepare_report(root) is None
    counts = {f"session{s}": {"neutral": s, "happy": 1, "sad": 2, "angry": 3, "total": s + 6} for s in range(1, 6)}
    write_text(join(root, "prepare_report.json"), json.dumps({"source": "somewhere", "counts": counts}))
    assert read_prepare_report(root)["counts"] == counts
    run = SimpleNamespace(config={"data": {"path": root}})
    experiment = SimpleNamespace(finished=[run], label_names=lambda: ["neutral", "happy", "sad", "angry"])
    table = counts_table([experiment])
    assert f"From `{root}/prepare_report.json`" in table
    assert "| session3 | 3 | 1 | 2 | 3 | 9 |" in table and "| **all** | **15** | **5** | **10** | **15** | **45** |" in table


def test_join_keeps_urls_intact():
    assert join("s3://bucket/prefix/", "session1", "x.parquet") == "s3://bucket/prefix/session1/x.parquet"
    assert join("hf://datasets/me/emo@main", "session2") == "hf://datasets/me/emo@main/session2"
    assert join("runs/prepared", "session1") == "runs/prepared/session1"


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("path", [
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/prepared", f"ftp://user:{SECRET}@host/prepared",
    # in the query string: an Azure SAS, an S3 / GCS presigned URL, a token
    f"abfs://container/prepared?sv=2022-11-02&ss=b&sig={SECRET}",
    f"https://bucket.s3.amazonaws.com/prepared?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SECRET}",
    f"gs://bucket/prepared?X-Goog-Credential={SECRET}", f"https://host/prepared#access_token={SECRET}",
])
def test_a_data_url_carrying_credentials_is_refused_without_repeating_them(path, tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.path={path}"])
    assert err.value.key == "data.path" and SECRET not in str(err.value)
    # The CLI: one line naming the key, exit code 2, before anything is read or written.
    assert main(["train", "configs/smoke.yaml", f"data.path={path}", f"output_dir={tmp_path / 'run'}"]) == 2
    printed = capsys.readouterr()
    assert "config error: data.path: must not carry credentials" in printed.err and SECRET not in printed.err + printed.out
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="OUT_DIR: must not carry credentials"):
        prepare(tmp_path / "no-release", path)


@pytest.mark.parametrize("path", ["s3://bucket/prepared", "hf://datasets/me/emotions@main/prepared",
                                  "runs/with@sign/prepared", "gs://bucket/a@b", "runs/what?sig=1",
                                  "sftp://user@host/prepared", "abfs://container@account.dfs.core.windows.net/prepared",
                                  "hf://datasets/me/emo?revision=main&split=train"])
def test_data_paths_without_credentials_are_accepted(path):
    assert load_config(None, [f"data.path={path}"]).data.path == path


@pytest.mark.parametrize("key", ["train.resume", "output_dir", "model.audio_encoder", "model.text_encoder",
                                 "model.tokenizer", "logging.run_name", "logging.tags"])
def test_any_config_key_given_a_url_with_credentials_is_refused_without_repeating_them(key, capsys):
    """Every string of the tree is checked, not data.path alone: each is printed by `emotrain config`
    and saved in the run's config.yaml."""
    url = f"s3://bucket/checkpoints/step-000004?X-Amz-Signature={SECRET}"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={url}"])
    assert err.value.key == (f"{key}[0]" if key == "logging.tags" else key) and SECRET not in str(err.value)
    assert main(["config", "configs/smoke.yaml", f"{key}={url}"]) == 2
    printed = capsys.readouterr()
    assert f"{key}" in printed.err and "must not carry credentials" in printed.err
    assert SECRET not in printed.err + printed.out


@pytest.mark.parametrize("argv, argument", [
    (["evaluate", "runs/none/best", f"memory://bucket/prepared?sig={SECRET}"], "DATA_DIR"),
    (["evaluate", f"s3://KEY:{SECRET}@bucket/best", "runs/prepared"], "MODEL_DIR"),
    (["predict", f"gs://bucket/best?X-Goog-Credential={SECRET}", "--audio", "clip.wav"], "MODEL_DIR"),
    (["prepare", f"memory://release?sig={SECRET}", "{out}"], "SOURCE"),
    (["prepare", "{out}-source", "{out}", "--kind", "emobox", "--download-root", f"s3://b/wav?token={SECRET}"],
     "--download-root"),
], ids=["evaluate-data", "evaluate-model", "predict-model", "prepare-source", "prepare-download-root"])
def test_command_arguments_carrying_credentials_are_refused_naming_the_argument(argv, argument, tmp_path, capsys):
    """The verb's own arguments, not only the config's keys: one line naming the argument (not
    data.path), exit 2, nothing written, and the secret nowhere."""
    out = str(tmp_path / "out")
    assert main([item.replace("{out}", out) for item in argv]) == 2
    printed = capsys.readouterr()
    lines = printed.err.strip().splitlines()
    assert lines[-1].startswith(f"emotrain {argv[0]}: error: {argument}: must not carry credentials"), printed.err
    assert SECRET not in printed.err + printed.out and not (tmp_path / "out").exists()


@pytest.fixture
def without_credentials(s3, monkeypatch):
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups (timeouts)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would still hold the credentials
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_that_cannot_be_reached_is_a_one_line_error_naming_the_key(s3, both, without_credentials, tmp_path, capsys):
    _, remote = both
    assert main(["train", "configs/smoke.yaml", f"data.path={remote}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config error: data.path: cannot reach {remote} (NoCredentialsError" in err, err
    assert "AWS_ACCESS_KEY_ID" in err and not (tmp_path / "run").exists()
    # prepare finds out before it reads (let alone encodes) anything: the release need not exist yet.
    with pytest.raises(ConfigError, match=r"OUT_DIR: cannot reach s3://.*NoCredentialsError"):
        prepare(tmp_path / "no-release-yet", s3.url("new"))


def test_any_source_s_output_is_checked_before_the_source_is_read(s3, without_credentials, tmp_path):
    from emotrain.data.sources import prepare_source

    missing = str(tmp_path / "not-written-yet.csv")  # reading it would be a FileNotFoundError
    with pytest.raises(ConfigError, match=r"OUT_DIR: cannot reach s3://.*NoCredentialsError"):
        prepare_source(missing, s3.url("manifest-corpus"), kind="manifest")
    with pytest.raises(ConfigError, match="OUT_DIR: must not carry credentials"):
        prepare_source(missing, "s3://KEY:SECRET@bucket/x", kind="manifest")


def test_a_dataset_description_is_written_to_and_read_from_s3(s3):
    from emotrain.data.shards import (
        IEMOCAP_INFO,
        DatasetInfo,
        leave_one_out_folds,
        read_dataset_info,
        write_dataset_info,
    )

    info = DatasetInfo(labels=("calm", "tense", "joyful"), groups={"group1": 1, "group2": 2},
                       folds=leave_one_out_folds([1, 2]), fold_kind="groups", has_text=False, source="test")
    write_dataset_info(s3.url("described"), info)
    assert read_dataset_info(s3.url("described")) == info  # not IEMOCAP's: read back from the bucket
    assert read_dataset_info(s3.url("nothing-here")) == IEMOCAP_INFO  # no dataset.json: a release's layout


def test_a_bucket_that_does_not_exist_is_a_one_line_error(s3, tmp_path, capsys):
    url = "s3://no-such-bucket-here/prepared"
    assert main(["train", "configs/smoke.yaml", f"data.path={url}", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"config error: data.path: cannot reach {url} (FileNotFoundError: The specified bucket does not exist)" in err


def test_the_endpoint_may_come_from_fsspec_configuration_instead_of_aws_variables(s3, both):
    """`FSSPEC_S3_ENDPOINT_URL` (fsspec's own configuration, read when fsspec is imported, hence a
    subprocess) reaches the server as `AWS_ENDPOINT_URL` does: the metadata and the `datasets` stream."""
    import os
    import subprocess
    import sys

    _, remote = both
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env.update(FSSPEC_S3_ENDPOINT_URL=s3.endpoint, HF_DATASETS_OFFLINE="1")
    code = ("import sys, datasets; from emotrain.data.folds import read_metadata; meta = read_metadata(sys.argv[1]); "
            "ds = datasets.load_dataset('parquet', data_files=list(meta.files), split='train', streaming=True); "
            "print(len(meta), sum(1 for _ in ds))")
    proc = subprocess.run([sys.executable, "-c", code, remote], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [str(sum(PER_SESSION))] * 2


def test_a_url_with_credentials_given_to_a_key_of_another_type_is_not_repeated():
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.max_steps=s3://bucket/x?sig={SECRET}"])
    assert err.value.key == "train.max_steps" and SECRET not in str(err.value)
    assert "a URL carrying credentials" in str(err.value)
