"""A private two-node Slurm cluster on this host, to run the sbatch scripts for real.

Debian's slurm-wlm (22.05) + munge, installed by `.ci/slurm-setup`; root is needed (slurmd runs the
jobs). Everything lives in one temp dir: a munge key and socket, slurm.conf, state/spool/log/pid files.
One slurmctld and two slurmd daemons (`slurmd -N n1`, `-N n2`, both on 127.0.0.1 with their own
ports) simulate a two-node cluster; all of them run in the foreground as children of this process
and are ended at the end of the session, with any job process that is left (found by its
`SLURM_CONF` pointing at this cluster's slurm.conf).

Without Slurm or root the tests are skipped with the reason; with EMOTRAIN_REQUIRE_SLURM=1 (set by
.ci/run when it could install Slurm) they fail instead, so CI cannot skip them silently.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import (
    REPO,
    free_port,
    subprocess_env,
    synthetic_corpus,  # noqa: F401  (the fixture, for tests/slurm too)
)

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin"])
REQUIRED = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2  # both "nodes" share this host's cores; a job takes a whole node with --cpus-per-task=2

# The requeue delay of Slurm is AuthInfo's cred_expire (120 s by default; the job stays PENDING with
# Reason=BeginTime until then) and pending jobs are only looked at every sched_interval (60 s by
# default): short values make a requeued job start again within seconds.
CRED_EXPIRE = 5
SLURM_CONF_TEMPLATE = """\
# A private test cluster (tests/slurm/conftest.py): two slurmd "nodes" on 127.0.0.1.
ClusterName=emotrain-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Batch jobs may be requeued (the scripts also ask for --requeue); nodes come back by themselves.
JobRequeue=1
ReturnToService=2
# Unique job ids per session: the scripts derive their port and stop-flag file from SLURM_JOB_ID.
FirstJobId={first_job_id}
# Finished jobs stay visible to `scontrol show job` (there is no accounting database for sacct).
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
KillWait=15
InactiveLimit=0
Waittime=0
NodeName={node1} NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs={cpus} State=UNKNOWN
NodeName={node2} NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={node1},{node2} Default=YES MaxTime=INFINITE State=UP
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("EMOTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"the Slurm tests are required here (EMOTRAIN_REQUIRE_SLURM=1) but {reason}", pytrace=False)
    pytest.skip(f"Slurm tests: {reason}")


def _tail(path: Path, chars: int = 4000) -> str:
    if not path.exists():
        return f"--- {path}: (missing)"
    text = path.read_text(errors="replace")
    return f"--- {path} (last {min(chars, len(text))} of {len(text)} chars):\n{text[-chars:]}"


def _field(record: str, key: str) -> str | None:
    """One `Key=value` of `scontrol show -o` output (values without spaces)."""
    match = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", record)
    return match.group(1) if match else None


class SlurmCluster:
    """The daemons, the client commands (with SLURM_CONF) and diagnostics of the private cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.munge_socket = root / "munge" / "munge.socket"
        self.first_job_id = random.randrange(100_000, 110_000)  # MAIN_PROCESS_PORT 20000 + id % 20000 stays < 32768
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.submitted: list[int] = []

    # ------------------------------------------------------------------------------------ clients

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default: ours) without any Slurm variable of an enclosing job, with SLURM_CONF set."""
        env = {k: v for k, v in (base if base is not None else os.environ).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = SBIN_PATH if base is None else env.get("PATH", SBIN_PATH)
        return env

    def command(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
                               f"{self.diagnostics()}")
        return proc

    def sbatch(self, *args: str, env: dict[str, str], cwd: Path = REPO) -> int:
        proc = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd,
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, f"sbatch {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}\n{self.diagnostics()}"
        job_id = int(proc.stdout.strip().split(";")[0])
        self.submitted.append(job_id)
        return job_id

    def job(self, job_id: int) -> str:
        """`scontrol show job -o JOBID`: one line of Key=value (use `_field` to read one)."""
        return self.command("scontrol", "show", "job", "-o", str(job_id)).stdout.strip()

    def wait_for_job(self, job_id: int, done: Callable[[str], bool], *, timeout: float, what: str,
                     files: tuple[Path, ...] = ()) -> str:
        """Poll `scontrol show job` until `done(record)`; fail with the job's files and the logs."""
        deadline = time.monotonic() + timeout
        record = ""
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if done(record):
                return record
            time.sleep(0.5)
        self.kill(job_id)  # free the nodes for the next test
        pytest.fail(f"job {job_id}: {what} not seen within {timeout:.0f} s\n{record}\n"
                    + self.diagnostics(*files), pytrace=False)

    def kill(self, job_id: int) -> None:
        """End a job for good: SIGKILL to every process (no trap runs, nothing is requeued), then cancel."""
        self.command("scancel", "--full", "--signal=KILL", str(job_id), check=False)
        self.command("scancel", str(job_id), check=False)

    def diagnostics(self, *files: Path) -> str:
        parts = [_tail(f, 8000) for f in files]
        parts.append(_tail(self.logs / "slurmctld.log", 3000))
        parts += [_tail(self.logs / f"slurmd-{node}.log", 2000) for node in NODES]
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------ daemons

    def _spawn(self, name: str, *args: str) -> None:
        with open(self.logs / f"{name}.console", "ab") as console:
            proc = subprocess.Popen(list(args), env=self.env(), stdout=console, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.daemons.append((name, proc))

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}\n"
                                       f"{_tail(self.logs / f'{name}.console')}\n{self.diagnostics()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what}: not ready within {timeout} s\n{self.diagnostics()}")

    def start(self) -> None:
        root = self.root
        for sub in ("munge", "state", "run", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o711)  # munged wants its socket folder reachable (not writable) by all
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = os.uname().nodename.split(".")[0]
        ports = set()
        while len(ports) < 3:  # three distinct free ports: slurmctld, slurmd n1, slurmd n2
            ports.add(free_port())
        ctld_port, port1, port2 = sorted(ports)
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            host=host, root=root, ctld_port=ctld_port, port1=port1, port2=port2, node1=NODES[0], node2=NODES[1],
            munge_socket=self.munge_socket, cred_expire=CRED_EXPIRE, first_job_id=self.first_job_id,
            cpus=CPUS_PER_NODE,
        ))

        self._spawn("munged", "munged", "--foreground", "--force", f"--key-file={key}",
                    f"--socket={self.munge_socket}", f"--pid-file={root}/run/munged.pid",
                    f"--log-file={self.logs}/munged.log", f"--seed-file={root}/munge/munged.seed")
        self._wait("munged", self.munge_socket.exists, timeout=30)
        self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.conf))
        self._wait("slurmctld", lambda: self.command("scontrol", "ping", check=False).stdout.count("UP") > 0)
        for node in NODES:
            self._spawn(f"slurmd-{node}", "slurmd", "-D", "-f", str(self.conf), "-N", node)

        def idle() -> bool:
            out = self.command("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n) == "idle" for n in NODES)

        self._wait("both nodes idle in sinfo", idle, timeout=60)

    def stop(self) -> None:
        """Cancel every job, end the daemons, then any process of this cluster's jobs that is left."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.daemons):
            # KILL, not TERM: nothing is to be saved, and no trap may requeue anything.
            self.command("scancel", "--full", "--signal=KILL", "--user=root", check=False, timeout=30)
            self.command("scancel", "--user=root", check=False, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not self.command("squeue", "-h", check=False, timeout=30).stdout.strip():
                    break
                time.sleep(0.5)
        for name, proc in reversed(self.daemons):  # slurmds, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)
        for pid in self.leftover_processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for job_id in self.submitted:  # the default stop-flag location of slurm/train.sbatch
            (REPO / f".emotrain-stop-{job_id}").unlink(missing_ok=True)

    def leftover_processes(self) -> list[int]:
        """Processes started for this cluster (slurmstepd, job steps): they carry our SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    if sys.platform != "linux":
        _unavailable("Linux only")
    missing = [cmd for cmd in REQUIRED if shutil.which(cmd, path=SBIN_PATH) is None]
    if missing:
        _unavailable(f"not installed: {', '.join(missing)} (as root: bash .ci/slurm-setup)")
    if os.geteuid() != 0:
        _unavailable("not running as root: the private cluster's slurmd must run as root (it starts the jobs)")

    root = tmp_path_factory.mktemp("slurm")
    if len(str(root / "munge" / "munge.socket")) > 100:  # a Unix socket path has at most 107 bytes
        root = Path(tempfile.mkdtemp(prefix="emotrain-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        deadline = time.monotonic() + 10  # SIGKILLed processes take a moment to disappear
        while (left := cluster.leftover_processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes of the test cluster still running after teardown: {left}"


def job_environment(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """What a test job is submitted with (sbatch exports it to the job): the training subprocess
    environment, the venv first on PATH (`accelerate`), one thread per process (two "nodes" share two
    cores), a CPU run of a MULTI_GPU launch config, and nothing inherited that the scripts read."""
    env = subprocess_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", **extra)
    for name in ("MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "EMOTRAIN_STOP_FILE", "LAUNCH_CONFIG", "PROCESSES_PER_NODE"):
        if name not in extra:
            env.pop(name, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), SBIN_PATH])
    return cluster.env(env)
