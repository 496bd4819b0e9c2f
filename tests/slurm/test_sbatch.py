"""slurm/train.sbatch and slurm/cv.sbatch on a real (private, two-node) Slurm cluster: 2-node DDP
training, preemption by Slurm's warning signal with a requeue of the same job that resumes exactly,
`scancel` ending a job for good, and a cross-validation array task training its fold.

The jobs train the tiny setup of `tiny_overrides` for EPOCHS epochs on the synthetic corpus, one
process per node (2 nodes: about 13 optimizer steps per epoch), through the script as a user submits it,
with only what a CPU-only cluster must change: `--gpus-per-node=0 --cpus-per-task=2` on the command
line, LAUNCH_CONFIG=launch/cpu_ddp.yaml, PROCESSES_PER_NODE=1 and ACCELERATE_USE_CPU=true exported.
Each run takes 10-30 s; the cluster starts in ~3 s; a requeued job starts again ~10 s after its requeue
(slurm.conf: cred_expire=5, sched_interval=1). All four tests: ~70 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.conftest import EMOTRAIN, REPO, tiny_overrides
from tests.slurm.conftest import (
    CPUS_PER_NODE,
    CRED_EXPIRE,
    SlurmCluster,
    _field,
    job_environment,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

EPOCHS = 2
JOB_TIMEOUT = 420  # one run: 15-30 s normally; generous for busy cores
COMMON = (f"train.max_epochs={EPOCHS}", "train.early_stopping_patience=0", "logging.log_every_steps=1",
          "train.keep_checkpoints_after_finish=true")  # the finished runs' checkpoints are inspected
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


# ------------------------------------------------------------------------------------------ helpers


def _submit(cluster: SlurmCluster, corpus: Path, out: Path, *, nodes: int) -> tuple[int, Path]:
    """`sbatch --nodes=N slurm/train.sbatch configs/smoke.yaml ...` from the repository root, as a user
    would; returns (job id, the job's output file)."""
    output = out.parent / f"{out.name}.slurm.out"
    # The tiny steps take ~0.1 s: look for the stop flag at every step so it lands where the test wants.
    env = job_environment(cluster, LAUNCH_CONFIG="launch/cpu_ddp.yaml", PROCESSES_PER_NODE="1",
                          EMOTRAIN_STOP_FILE_POLL_SECONDS="0")
    job_id = cluster.sbatch(
        f"--nodes={nodes}", f"--cpus-per-task={CPUS_PER_NODE}", "--gpus-per-node=0",  # no GPUs on this cluster
        f"--job-name=emotrain-{out.name}", f"--output={output}",
        "slurm/train.sbatch", "configs/smoke.yaml", *tiny_overrides(corpus, out, *COMMON), env=env,
    )
    return job_id, output


def _steps(log: str) -> tuple[int, int]:
    """(optimizer steps of the whole run, of its first epoch) as the run logs them at its start."""
    match = re.search(r"INFO (\d+) optimizer steps \((\d+) in this epoch", log)
    assert match, "no step count in the log"
    return int(match.group(1)), int(match.group(2))


def _state(record: str) -> str:
    return (_field(record, "JobState") or "?").split("+")[0]


def _restarts(record: str) -> int:
    return int(_field(record, "Restarts") or 0)


def _logged_step(log_file: Path) -> int:
    if not log_file.exists():
        return 0
    return max((int(s) for s in re.findall(r"INFO step (\d+) epoch", log_file.read_text(errors="replace"))), default=0)


def _wait_for_step(cluster: SlurmCluster, job_id: int, out: Path, output: Path, step: int) -> None:
    """Wait until the run's train.log shows `step` (the job must still be running)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        if _logged_step(out / "train.log") >= step:
            return
        record = cluster.job(job_id)
        if _state(record) in FINISHED:
            cluster.kill(job_id)  # a requeued job could come back
            pytest.fail(f"job {job_id} ended ({_state(record)}) before step {step}:\n{record}\n"
                        + cluster.diagnostics(output, out / "train.log"), pytrace=False)
        time.sleep(0.1)
    cluster.kill(job_id)
    pytest.fail(f"job {job_id}: step {step} not logged within {JOB_TIMEOUT} s\n"
                + cluster.diagnostics(output, out / "train.log"), pytrace=False)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, synthetic_corpus, tmp_path_factory):
    """One uninterrupted 2-node job: checked by the DDP test, the reference of the requeue test."""
    out = tmp_path_factory.mktemp("slurm-ddp") / "run"
    started = time.monotonic()
    job_id, output = _submit(slurm_cluster, synthetic_corpus, out, nodes=2)
    record = slurm_cluster.wait_for_job(job_id, lambda r: _state(r) in FINISHED, timeout=JOB_TIMEOUT,
                                        what="the end of the job", files=(output, out / "train.log"))
    return job_id, record, out, output, time.monotonic() - started


# ------------------------------------------------------------------------------------------ tests


def test_two_node_ddp_job(slurm_cluster, two_node_run):
    job_id, record, out, output, seconds = two_node_run
    why = f"{record}\n" + slurm_cluster.diagnostics(output, out / "train.log")
    assert _state(record) == "COMPLETED" and _field(record, "ExitCode") == "0:0", why
    assert _field(record, "NumNodes") == "2" and _field(record, "NodeList") == "n[1-2]", why
    log = (out / "train.log").read_text()
    # One accelerate launch per node made one 2-process DDP world (a silent 1-process run fails here).
    assert "INFO 2 process(es), DistributedType.MULTI_CPU," in log, why
    total, _ = _steps(log)
    assert f"training stopped: max_epochs after {total} steps" in log, why
    assert "terminate called" not in output.read_text(errors="replace"), why
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == total and metrics["stop_reason"] == "max_epochs", metrics
    # Both nodes ran a task of the job's step (one accelerate launch each), and every rank saved its stream.
    for node in ("n1", "n2"):
        slurmd_log = (slurm_cluster.logs / f"slurmd-{node}.log").read_text(errors="replace")
        assert f"StepId={job_id}.0" in slurmd_log, f"no task of step {job_id}.0 on {node}\n{why}"
    last = max((out / "checkpoints").glob("step-*"))
    assert {p.name for p in last.glob("stream-rank*.json")} == {"stream-rank0.json", "stream-rank1.json"}
    print(f"2-node DDP job: {seconds:.0f} s")


def test_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, synthetic_corpus, two_node_run, tmp_path):
    """Slurm's warning signal (`--signal=B:USR1@300`, sent here with scancel) → the run saves and exits →
    the script requeues the same job → it resumes from that checkpoint and ends like an uninterrupted run."""
    out = tmp_path / "run"
    reference_out = two_node_run[2]
    assert (reference_out / "metrics.json").exists(), "the reference job failed: see test_two_node_ddp_job"
    total, steps_epoch0 = _steps((reference_out / "train.log").read_text())
    started = time.monotonic()
    job_id, output = _submit(slurm_cluster, synthetic_corpus, out, nodes=2)
    files = (output, out / "train.log")
    stop_after = steps_epoch0 + 2  # inside the second epoch: the data stream resumes mid-epoch
    _wait_for_step(slurm_cluster, job_id, out, output, stop_after)
    # What Slurm does 300 s before the time limit: USR1 to the batch shell only (not to the job steps).
    slurm_cluster.command("scancel", "--signal=USR1", "--batch", str(job_id))

    slurm_cluster.wait_for_job(job_id, lambda r: _restarts(r) >= 1, timeout=JOB_TIMEOUT,
                               what="a requeue (Restarts=1)", files=files)
    record = slurm_cluster.wait_for_job(job_id, lambda r: _state(r) in FINISHED, timeout=JOB_TIMEOUT + 60,
                                        what="the end of the requeued job", files=files)
    why = f"{record}\n" + slurm_cluster.diagnostics(*files)
    assert _state(record) == "COMPLETED" and _field(record, "ExitCode") == "0:0", why
    assert _restarts(record) == 1, why  # requeued once, and the same job id ran again

    # The output file has both runs (--open-mode=append): the stop, the requeue, then the resume.
    text = output.read_text(errors="replace")
    flag = REPO / f".emotrain-stop-{job_id}"  # the script's default flag file, in the submit directory
    stop = re.search(rf"stop requested \(flag file {re.escape(str(flag))}\): saving step (\d+) and exiting with 75", text)
    assert stop, why
    step = int(stop.group(1))
    assert stop_after <= step < total, (step, why)
    requeue = text.find(f"requeueing job {job_id}")
    resumed = text.find(f"resumed from {out / 'checkpoints' / f'step-{step:06d}'} (epoch 1, step {step})")
    assert stop.start() < requeue < resumed, f"stop at {stop.start()}, requeue at {requeue}, resume at {resumed}\n{why}"
    assert text.count("requeueing job") == 1, why
    log = (out / "train.log").read_text()
    assert log.count("INFO 2 process(es), DistributedType.MULTI_CPU,") == 2, why  # both attempts: 2 ranks
    assert f"training stopped: max_epochs after {total} steps" in log, why
    assert not flag.exists(), f"{flag} left behind"

    # Exactly the uninterrupted run's result.
    reference = json.loads((reference_out / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == reference
    expected, got = _weights(reference_out / "best"), _weights(out / "best")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    print(f"stopped at step {step}, requeued and finished: {time.monotonic() - started:.0f} s")


def test_scancel_ends_the_job_without_a_requeue(slurm_cluster, synthetic_corpus, tmp_path):
    """`scancel` (SIGTERM to the batch shell and every task) checkpoints but must not bring the job back."""
    out = tmp_path / "run"
    job_id, output = _submit(slurm_cluster, synthetic_corpus, out, nodes=1)
    files = (output, out / "train.log")
    _wait_for_step(slurm_cluster, job_id, out, output, 2)
    slurm_cluster.command("scancel", str(job_id))
    record = slurm_cluster.wait_for_job(job_id, lambda r: _state(r) in FINISHED and "COMPLETING" not in
                                        (_field(r, "JobState") or ""), timeout=120, what="the end of the job",
                                        files=files)
    time.sleep(CRED_EXPIRE + 4)  # a requeued job would be pending or running again by now
    record = slurm_cluster.job(job_id)
    why = f"{record}\n" + slurm_cluster.diagnostics(*files)
    assert _state(record) == "CANCELLED" and _restarts(record) == 0, why
    text = output.read_text(errors="replace")
    assert "TERM: the run checkpoints" in text and "requeueing" not in text, why
    # The run saved on the way out (SIGTERM reaches every task; the batch shell's trap adds the flag).
    saved = re.search(r"stop requested \(.*\): saving step (\d+) and exiting with 75", text)
    assert saved, why
    assert (out / "checkpoints" / f"step-{int(saved.group(1)):06d}" / "COMPLETE").is_file(), why
    assert not (REPO / f".emotrain-stop-{job_id}").exists()


def test_cv_submits_an_array_and_a_report_that_waits_for_it(slurm_cluster, synthetic_corpus, tmp_path):
    """`emotrain cv --slurm`: the unfinished runs as one array job (slurm/cv.sbatch, each task through
    train.sbatch), then slurm/report.sbatch depending on the whole array; a second call submits no
    training for the finished folds."""
    env = job_environment(slurm_cluster, LAUNCH_CONFIG="launch/cpu_ddp.yaml", PROCESSES_PER_NODE="1")
    overrides = [o for o in tiny_overrides(synthetic_corpus, Path("unused"), "train.max_epochs=1")
                 if not o.startswith("output_dir=")]
    command = [*EMOTRAIN, "cv", "configs/smoke.yaml", *overrides, f"output_dir={tmp_path}/{{experiment}}/fold{{fold}}",
               "--folds", "1,2", "--slurm", "--sbatch",
               f"--cpus-per-task={CPUS_PER_NODE} --gpus-per-node=0 --output={tmp_path}/slurm-%A_%a.out",
               f"--report-sbatch=--output={tmp_path}/report-%j.out"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array_id = int(re.search(r"submitted 2 training run\(s\) as array job (\d+)", proc.stdout).group(1))
    report_id = int(re.search(r"submitted the report as job (\d+) \(after every task of", proc.stdout).group(1))
    slurm_cluster.submitted += [array_id, report_id]
    files = (tmp_path / f"slurm-{array_id}_0.out", tmp_path / f"slurm-{array_id}_1.out")
    record = slurm_cluster.wait_for_job(report_id, lambda r: _state(r) in FINISHED, timeout=2 * JOB_TIMEOUT,
                                        what="the end of the report job", files=files)
    why = f"{record}\n" + slurm_cluster.diagnostics(*files)
    assert _state(record) == "COMPLETED", why
    for task, fold in ((0, 1), (1, 2)):
        task_record = slurm_cluster.job(f"{array_id}_{task}")
        assert _state(task_record) == "COMPLETED" and _field(task_record, "ExitCode") == "0:0", task_record
        # The report waited for the whole array (afterany): it started after every task had ended.
        assert _field(record, "StartTime") >= _field(task_record, "EndTime"), (record, task_record)
        log = (tmp_path / "smoke" / f"fold{fold}" / "train.log").read_text()
        assert re.search(rf'INFO fold {fold}: \{{"fold": {fold}, .*"test_session": {fold},', log), why
    report = (tmp_path / "smoke" / "report" / "report.md").read_text()
    assert "| smoke | fusion | 2/2 |" in report and "Not counted" not in report, report

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "array job" not in again.stdout and "submitted the report as job" in again.stdout, again.stdout
    slurm_cluster.submitted.append(int(re.search(r"report as job (\d+)", again.stdout).group(1)))
