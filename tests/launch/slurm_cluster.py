"""A real two-node SLURM cluster on this machine, for the launcher tests.

slurmctld and two slurmd (``n1``, ``n2``, both ``NodeAddr=127.0.0.1`` with their own ports) under Debian's
slurm-wlm, authenticated by a private munged; each node has one count-only ``gpu`` gres so the
launchers' ``--gpus-per-node`` requests are scheduled as on a GPU cluster. Everything lives in one
folder (config, state, spool, logs, munge socket) and goes away with ``stop()``. Facts it relies on:
../shared/reference/README.md section 11.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.dist import free_port

DAEMONS = ("slurmctld", "slurmd", "munged", "scontrol", "sbatch")
NODES = ("n1", "n2")

SLURM_CONF = """\
ClusterName=posttraintest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.sock
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
SlurmdTimeout=10
ReturnToService=2
KillWait=5
MinJobAge=600
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def missing_tools() -> list[str]:
    return [tool for tool in DAEMONS if shutil.which(tool) is None]


@dataclass
class Job:
    job_id: str
    state: str
    restarts: int
    reason: str
    nodes: str


class SlurmCluster:
    """Start with ``SlurmCluster.start()``; ``env`` is what a client (sbatch, scontrol) needs."""

    def __init__(self, base: Path):
        self.base = base
        self.conf = base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # ------------------------------------------------------------------------------- lifecycle

    @classmethod
    def start(cls, cpus_per_node: int = 2, timeout_s: float = 30.0) -> "SlurmCluster":
        # munged refuses a socket below folders others cannot enter: not under pytest's 0700 tmp folders
        cluster = cls(Path(tempfile.mkdtemp(prefix="posttrain-slurm-", dir="/tmp")))
        cluster.base.chmod(0o755)
        try:
            cluster._write_config(cpus_per_node)
            cluster._start_munge()
            cluster._run("slurmctld", "-c")
            for node in NODES:
                cluster._run("slurmd", "-N", node)
            cluster._wait_idle(timeout_s)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_config(self, cpus_per_node: int) -> None:
        for folder in ("state", "log", *(f"spool/{node}" for node in NODES)):
            (self.base / folder).mkdir(parents=True)
        nodes = "\n".join(f"NodeName={node} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus_per_node} "
                          f"RealMemory=1000 Gres=gpu:1 State=UNKNOWN" for node in NODES)
        self.conf.write_text(SLURM_CONF.format(base=self.base, ctld_port=free_port(), nodes=nodes,
                                               node_list=",".join(NODES)))
        # without File= the nodes register INVALID; /dev/null makes the gpu a count, nothing more
        (self.base / "gres.conf").write_text(f"NodeName={','.join(NODES)} Name=gpu File=/dev/null\n")

    def _start_munge(self) -> None:
        munge = self.base / "munge"
        munge.mkdir()
        user = pwd.getpwnam("munge")
        key = munge / "munge.key"
        system_key = Path("/etc/munge/munge.key")
        key.write_bytes(system_key.read_bytes() if system_key.is_file() else os.urandom(128))
        for path in (munge, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        munge.chmod(0o755)
        key.chmod(0o600)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge}/munge.sock",
                        f"--pid-file={munge}/munged.pid", f"--seed-file={munge}/munged.seed",
                        f"--key-file={key}", f"--log-file={munge}/munged.log"], check=True, timeout=30)

    def _run(self, *command: str) -> None:
        subprocess.run(list(command), env=self.env, check=True, timeout=30)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            states = result.stdout.strip()
            if result.returncode == 0 and states.count("idle") == len(NODES):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test cluster's nodes did not become idle in {timeout_s} s: {states!r}; "
                           f"logs in {self.base / 'log'}")

    def stop(self) -> None:
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for pid_file in [*self.base.glob("slurm*.pid"), self.base / "munge" / "munged.pid"]:
            self._kill_from(pid_file)
        # job steps (slurmstepd and what it ran) outlive their daemons: end them with the cluster
        subprocess.run(["pkill", "-KILL", "-f", f"slurmstepd.*{self.base}"], capture_output=True)
        for pid in self.job_pids():
            _kill(pid, signal.SIGKILL)
        if os.environ.get("POSTTRAIN_KEEP_SLURM_LOGS"):  # to read slurmctld/slurmd logs after a failed test
            print(f"slurm cluster kept in {self.base}")
            return
        shutil.rmtree(self.base, ignore_errors=True)

    @staticmethod
    def _kill_from(pid_file: Path) -> None:
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            return
        _kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.1)
        _kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------------------- queries

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def job(self, job_id: str) -> Job:
        fields = dict(re.findall(r"(\w+)=(\S*)", self.scontrol("show", "job", "-o", job_id)))
        return Job(job_id=job_id, state=fields["JobState"], restarts=int(fields.get("Restarts", 0)),
                   reason=fields.get("Reason", ""), nodes=fields.get("NodeList", ""))

    def node_addr(self, node: str) -> str:
        return re.search(r"NodeAddr=(\S+)", self.scontrol("show", "node", node)).group(1)

    def wait_for(self, job_id: str, states: set[str], timeout_s: float) -> Job:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job.state} ({job.reason}) after {timeout_s} s, "
                                   f"not {sorted(states)}")
            time.sleep(0.3)

    def start_now(self, job_id: str) -> None:
        """After a requeue SLURM holds the job back about two minutes: release it at once."""
        self.scontrol("update", f"JobId={job_id}", "StartTime=now")

    def job_pids(self, job_id: str | None = None, node: str | None = None, variable: str | None = None) -> list[int]:
        """Processes started for jobs of this cluster (optionally: of one job, on one node, with
        ``variable`` in their environment, e.g. LOCAL_RANK for torchrun's ranks), from their environment:
        both nodes run on this machine, so ``scontrol listpids`` cannot tell them apart."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(
                    errors="replace").split("\0") if "=" in item)
            except OSError:
                continue
            if environ.get("SLURM_CONF") != str(self.conf) or "SLURM_JOB_ID" not in environ:
                continue
            if (job_id is None or environ["SLURM_JOB_ID"] == job_id) and \
                    (node is None or environ.get("SLURMD_NODENAME") == node) and \
                    (variable is None or variable in environ):
                pids.append(int(proc.name))
        return pids


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
