"""Prepared data on object storage, end to end, against a real S3 server started here (moto's server
mode on 127.0.0.1, s3fs as the client; fake credentials and the endpoint in the environment only):

- `emotrain prepare RELEASE s3://bucket/prepared` writes the same shards and report as to disk;
- a 2-process DDP run (gloo, 1 DataLoader worker per rank) trains from `data.path=s3://...`, is
  stopped mid-epoch at an exact step, and the same command resumes it: weights, metrics.json and the
  batches each rank trained on equal the uninterrupted run's;
- nothing was copied to local disk (the datasets cache and the temp dir hold no shard data; the
  server saw every training shard read), and the secret key is nowhere in what the runs wrote
  (config.yaml, train.log, checkpoints, metrics.json, W&B offline files) nor in their console;
- `emotrain evaluate best s3://...` scores the test session as the run did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from emotrain.data.shards import filesystem
from tests.integration.conftest import (
    ACCELERATE,
    EMOTRAIN,
    PROBE,
    REPO,
    free_port,
    read_probe,
    subprocess_env,
    tiny_overrides,
)
from tests.s3_server import running_s3_server

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EPOCHS = 2
TIMEOUT = 420  # one launch: ~20-30 s normally, on busy cores more
COMMON = (f"train.max_epochs={EPOCHS}", "train.early_stopping_patience=0", "logging.log_every_steps=1",
          "data.num_workers=1", "train.checkpoint_every_steps=0", "logging.report_to=[wandb]")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with running_s3_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory) -> dict[str, Path]:
    """The datasets cache and the temp dir of every subprocess here: they must stay free of shard data."""
    root = tmp_path_factory.mktemp("local-disk")
    dirs = {"HF_DATASETS_CACHE": root / "hf-datasets-cache", "TMPDIR": root / "tmp"}
    for folder in dirs.values():
        folder.mkdir()
    return dirs


def _env(local_dirs: dict[str, Path], **extra: str) -> dict[str, str]:
    # launch/cpu_ddp.yaml is a MULTI_GPU config: on CPU it needs ACCELERATE_USE_CPU (then MULTI_CPU over gloo).
    return subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
                          **{name: str(path) for name, path in local_dirs.items()}, **extra)


@pytest.fixture(scope="module")
def prepared(s3, synthetic_corpus, local_dirs, tmp_path_factory) -> str:
    """`emotrain prepare` of the fixture corpus's release straight into the bucket."""
    url = s3.url("prepared")
    proc = subprocess.run([*EMOTRAIN, "prepare", str(synthetic_corpus.parent / "release"), url, "--workers", "1"],
                          cwd=REPO, env=_env(local_dirs), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {url}/prepare_report.json" in proc.stdout
    return url


def _launch(data: str, out: Path, probe: Path, local_dirs: dict[str, Path], **extra_env: str) -> tuple[int, str]:
    """One `accelerate launch` of 2 CPU processes (the test probe) to its end: (exit code, console)."""
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "launch" / "cpu_ddp.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(PROBE), "train", str(REPO / "configs" / "smoke.yaml"),
           *tiny_overrides(data, out, *COMMON)]
    console = out.parent / f"{out.name}.console.txt"
    with open(console, "a") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(local_dirs, EMOTRAIN_PROBE_DIR=str(probe), **extra_env),
                                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks (their own process group)
        proc.wait(30)
        pytest.fail(f"no exit within {TIMEOUT} s\n{console.read_text(errors='replace')[-6000:]}")
    text = console.read_text(errors="replace")
    return rc, text


@pytest.fixture(scope="module")
def reference(prepared, local_dirs, tmp_path_factory):
    """An uninterrupted 2-process run from the bucket."""
    root = tmp_path_factory.mktemp("reference")
    rc, log = _launch(prepared, root / "run", root / "probe", local_dirs)
    assert rc == 0, log[-6000:]
    assert "INFO 2 process(es), DistributedType.MULTI_CPU," in log, log[-6000:]  # not a silent single process
    assert "training stopped: max_epochs after" in log and "terminate called" not in log, log[-6000:]
    return root / "run", root / "probe", log


def test_prepare_writes_the_same_shards_and_report_to_the_bucket(s3, prepared, synthetic_corpus):
    fs, root = filesystem(prepared)
    names = sorted(path[len(root) + 1:] for path in fs.find(root))
    assert names == ["dataset.json", "prepare_report.json"] + [f"session{s}/data-{i:05d}-of-00008.parquet"
                                                               for s in range(1, 6) for i in range(8)]
    with fs.open(f"{root}/dataset.json") as handle:  # the same description as the local prepare's
        assert json.load(handle) == json.loads((synthetic_corpus / "dataset.json").read_text())
    for name in names[2:]:  # the local fixture prepared the same release: the same rows, bit for bit
        with fs.open(f"{root}/{name}", "rb") as handle:
            assert pq.read_table(handle).equals(pq.read_table(synthetic_corpus / name)), name
    with fs.open(f"{root}/prepare_report.json") as handle:
        report = json.load(handle)
    local_report = json.loads((synthetic_corpus / "prepare_report.json").read_text())
    assert report["counts"] == local_report["counts"] and report["kept"] == local_report["kept"] == 240


def test_a_two_process_run_from_s3_stops_and_resumes_exactly(s3, prepared, reference, local_dirs, tmp_path):
    ref_out, ref_probe, ref_log = reference
    ref_metrics = json.loads((ref_out / "metrics.json").read_text())
    steps_epoch0 = len([r for r in read_probe(ref_probe)[0] if r["epoch"] == 0])  # accumulation 1
    stop_at = steps_epoch0 + 2  # inside the second epoch: the stream resumes mid-epoch, from the bucket
    assert stop_at < ref_metrics["steps"], (stop_at, ref_metrics["steps"])

    out, probe = tmp_path / "run", tmp_path / "probe"
    rc, first = _launch(prepared, out, probe, local_dirs, EMOTRAIN_PROBE_STOP_AT_STEP=str(stop_at))
    # The ranks exit with 75; torchrun's agent reports any non-zero worker as a failure (1).
    assert rc == 1 and f"saving step {stop_at} and exiting with 75" in first, first[-6000:]
    assert not (out / "metrics.json").exists()
    rc, second = _launch(prepared, out, probe, local_dirs)  # the same command again
    assert rc == 0, second[-6000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{stop_at:06d}'} (epoch 1, step {stop_at})" in second, second[-6000:]

    # Exactly the uninterrupted run: metrics, best weights, and every rank's batches (ids, in order,
    # with the weights at the start of each step).
    assert json.loads((out / "metrics.json").read_text()) == ref_metrics
    expected, got = load_file(ref_out / "best" / "model.safetensors"), load_file(out / "best" / "model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert read_probe(probe) == read_probe(ref_probe)
    assert sorted(read_probe(probe)) == [0, 1]

    # The data came from the bucket, read where it lies: the config names the URL, the server served
    # every shard of the training sessions, and no shard data reached local disk.
    for run in (ref_out, out):
        assert f"  path: {prepared}\n" in (run / "config.yaml").read_text()
    bucket_prefix = prepared[len("s3://"):]
    served = set(s3.requested())
    assert {f"{bucket_prefix}/session{s}/data-{i:05d}-of-00008.parquet" for s in (2, 3, 4, 5) for i in range(8)} <= served
    cache_files = [p for p in local_dirs["HF_DATASETS_CACHE"].rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in cache_files) < 64 * 1024, cache_files
    for folder in local_dirs.values():
        copied = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".parquet", ".arrow", ".flac")]
        assert not copied, copied

    # The credentials stayed in the environment: not in any file the runs wrote, nor on the console.
    written = [p for run in (ref_out, out) for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".wandb" for p in written)
    assert any(p.name == "train.log" for p in written) and any(p.name == "metrics.json" for p in written)
    for path in written:
        data = path.read_bytes()
        assert s3.secret.encode() not in data and s3.key_id.encode() not in data, path
    for text in (ref_log, first, second):
        assert s3.secret not in text and s3.key_id not in text


def test_evaluate_scores_a_model_on_data_in_the_bucket(prepared, reference, local_dirs):
    ref_out, _, _ = reference
    metrics = json.loads((ref_out / "metrics.json").read_text())
    proc = subprocess.run([*EMOTRAIN, "evaluate", str(ref_out / "best"), prepared, "--session", "1"],
                          cwd=REPO, env=_env(local_dirs), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["data"] == prepared
    assert result["test"]["confusion"] == metrics["test"]["confusion"] and result["test"]["n"] == metrics["test"]["n"]
