"""The launchers against a real SLURM cluster on this machine (``slurm_cluster.SlurmCluster``: slurmctld and
two slurmd, munge, one count-only gpu per node): every run is a tiny post-training of 2 ranks, one per
node, and every interrupted run must end with the weights of the uninterrupted one, bit for bit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster, missing_tools

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MAX_STEPS = 30
CHECKPOINT_EVERY = 8
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster():
    missing = missing_tools()
    if missing or os.geteuid() != 0:  # `make test` installs slurm-wlm and munge; the daemons run as root
        pytest.fail(f"a real SLURM cluster needs root and Debian's slurm-wlm and munge (missing: "
                    f"{', '.join(missing) or 'root'}): `make test` installs them")
    started = SlurmCluster.start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def project(shard_dir, tmp_path_factory) -> Path:
    """A project folder as a user has it: the launchers (linked), one preset training on ``shard_dir``."""
    root = tmp_path_factory.mktemp("slurm_project")
    (root / "launch").symlink_to(REPO / "launch")
    (root / "configs" / "posttrain").mkdir(parents=True)
    (root / "configs" / "posttrain" / "tinyrun.yaml").write_text(f"""\
model: {{preset: tiny}}
data:
  train: {{shards: [{shard_dir}], num_workers: 1, max_batch_seconds: 2.0, crop: {{policy: none}}}}
optim: {{lr: 0.001}}
schedule: {{warmup_steps: 2, decay_end_steps: {MAX_STEPS}}}
train: {{max_steps: {MAX_STEPS}, max_epochs: 100, precision: fp32, zero_stage: 2, device: cpu, log_every_steps: 1}}
checkpoint: {{every_steps: {CHECKPOINT_EVERY}, every_minutes: 0, keep_last: 20}}
tracking: {{enabled: false}}
""")
    return root


def _env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    return {**cluster.env, "VENV": sys.prefix, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _submit(cluster: SlurmCluster, project: Path, job_name: str) -> str:
    """``launch/slurm_posttrain.sh tinyrun`` on both nodes, one rank each; the job id."""
    done = subprocess.run(["bash", "launch/slurm_posttrain.sh", "tinyrun"], cwd=project, capture_output=True,
                          text=True, timeout=120,
                          env=_env(cluster, NODES="2", GPUS_PER_NODE="1", CPUS_PER_TASK="1", JOB_NAME=job_name))
    assert done.returncode == 0, done.stdout + done.stderr
    return re.search(r"Submitted batch job (\d+)", done.stdout).group(1)


def _output(project: Path, job_name: str) -> Path:
    return project / "runs" / "tinyrun" / job_name


def _log(project: Path, job_name: str, job_id: str) -> str:
    # both nodes' ranks write into one file through srun: a multi-byte character (a progress bar's) can be
    # cut by the other node's line, so the log is read as text with such bytes replaced
    return (project / "logs" / f"{job_name}-{job_id}.out").read_text(errors="replace")


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from posttrain.train.checkpoint import consolidate_fp32

    state, metadata = consolidate_fp32(output_dir / "checkpoints")
    assert metadata["progress"]["step"] == MAX_STEPS
    return state


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ in {different[:5]}"


def _wait_for_checkpoint(output_dir: Path, step: int, job_id: str, cluster: SlurmCluster) -> None:
    done = output_dir / "checkpoints" / f"step-{step:08d}" / "posttrain.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not done.exists():
        job = cluster.job(job_id)
        assert job.state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job_id} is {job.state} ({job.reason})"
        assert time.monotonic() < deadline, f"no checkpoint at step {step} after {RUN_TIMEOUT_S} s"
        time.sleep(0.1)


def _finish_requeued(cluster: SlurmCluster, job_id: str) -> None:
    """The job requeued itself: start it at once (SLURM would wait ~2 min), then let it finish."""
    requeued = cluster.wait_for(job_id, {"PENDING", "COMPLETED", "FAILED"}, 60)
    assert requeued.state == "PENDING" and requeued.restarts == 1, requeued
    cluster.start_now(job_id)
    finished = cluster.wait_for(job_id, {"COMPLETED", "FAILED"}, RUN_TIMEOUT_S)
    assert finished.state == "COMPLETED", finished


@pytest.fixture(scope="module")
def uninterrupted(cluster, project) -> dict[str, torch.Tensor]:
    """One uninterrupted 2-node job, with a local torchrun run of the same preset at world size 2 (in
    parallel): both must end with the same weights; the job's are returned."""
    job_id = _submit(cluster, project, "whole")
    local_out = project / "runs" / "local-ws2"
    local = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
                              str(BIN / "posttrain"), "train", "--config", "configs/posttrain/tinyrun.yaml",
                              f"output_dir={local_out}"], cwd=project, env=_env(cluster),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job = cluster.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, RUN_TIMEOUT_S)
    log = _log(project, "whole", job_id)
    assert job.state == "COMPLETED", log[-3000:]
    output, _ = local.communicate(timeout=RUN_TIMEOUT_S)
    assert local.returncode == 0, output[-3000:]
    # one rank per node, the rendezvous at the first node's NodeAddr (no /etc/hosts entry for n1)
    assert job.nodes == "n[1-2]"
    assert f"rendezvous {cluster.node_addr('n1')}:" in log
    weights = _weights(_output(project, "whole"))
    _assert_identical(weights, _weights(local_out))
    return weights


def test_a_two_node_job_ends_like_a_local_world_size_2_run(uninterrupted):
    assert uninterrupted  # the fixture compared them


def test_usr1_checkpoints_requeues_and_the_resumed_job_ends_identical(cluster, project, uninterrupted):
    """``scancel --signal=USR1 --batch`` is what SLURM's ``--signal=B:USR1@N`` sends before the limit."""
    job_id = _submit(cluster, project, "signalled")
    output_dir = _output(project, "signalled")
    _wait_for_checkpoint(output_dir, CHECKPOINT_EVERY, job_id, cluster)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=cluster.env, check=True, timeout=30)
    _finish_requeued(cluster, job_id)
    log = _log(project, "signalled", job_id)
    stop = re.search(r'"received_after_step":(\d+),"stopped_after_step":(\d+)', log)
    assert stop, log[-3000:]
    received, stopped = map(int, stop.groups())
    _assert_stopped_on_the_signal(received, stopped, log)
    print(f"\nUSR1 arrived after step {received}; checkpoint at step {stopped}; resumed from step {stopped}")
    _assert_identical(uninterrupted, _weights(output_dir))


def _assert_stopped_on_the_signal(received: int, stopped: int, log: str) -> None:
    """The checkpoint is the signal's own, not a periodic one, and the requeued run resumed from it. A signal
    recorded after step k (k steps done) is agreed in the all-reduce at the end of the step in flight (k + 1),
    or of the next one when it came after that all-reduce had started (k + 2); at an epoch end, between
    steps, the same step (k)."""
    assert CHECKPOINT_EVERY <= received and received <= stopped <= received + 2 and stopped < MAX_STEPS
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and int(resumed.group(1)) == stopped, log[-3000:]


def test_submitit_job_preempted_and_resumed_ends_identical(cluster, project, uninterrupted, tmp_path):
    output_dir = project / "runs" / "submitit"
    # the documented form: options first, then overrides
    done = subprocess.run([sys.executable, "launch/submit.py", "configs/posttrain/tinyrun.yaml", "--nodes", "2",
                           "--gpus-per-node", "1", "--tasks-per-node", "1", "--cpus-per-task", "1",
                           "--output-dir", str(output_dir), "--logs", str(tmp_path / "submitit"),
                           "train.device=cpu"], cwd=project, capture_output=True, text=True, timeout=120,
                          env=_env(cluster))
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = re.search(r"as job (\d+)", done.stdout).group(1)
    _wait_for_checkpoint(output_dir, CHECKPOINT_EVERY, job_id, cluster)
    # what SLURM sends every task before the limit under submitit's --signal=USR2@N
    subprocess.run(["scancel", "--signal=USR2", job_id], env=cluster.env, check=True, timeout=30)
    _finish_requeued(cluster, job_id)
    logs = "".join(path.read_text(errors="replace")
                   for path in sorted((tmp_path / "submitit").rglob(f"{job_id}_0_log.*")))
    stop = re.search(r"SIGUSR2 received after step (\d+): checkpoint \S+ written at step (\d+)", logs)
    assert stop, logs[-3000:]
    received, stopped = map(int, stop.groups())
    _assert_stopped_on_the_signal(received, stopped, logs)
    assert "Requeued job" in logs  # by submitit's own handler, after the checkpoint
    print(f"\nUSR2 arrived after step {received}; checkpoint at step {stopped}; resumed from step {stopped}")
    _assert_identical(uninterrupted, _weights(output_dir))


def test_killing_one_nodes_ranks_fails_the_job_naming_the_node_and_a_resubmission_resumes(
        cluster, project, uninterrupted):
    job_id = _submit(cluster, project, "killed")
    output_dir = _output(project, "killed")
    _wait_for_checkpoint(output_dir, CHECKPOINT_EVERY, job_id, cluster)
    ranks = cluster.job_pids(job_id, node="n2", variable="LOCAL_RANK")
    assert ranks
    killed_at = time.monotonic()
    for pid in ranks:
        os.kill(pid, 9)
    failed = cluster.wait_for(job_id, {"FAILED", "COMPLETED", "CANCELLED"}, 60)
    print(f"\nkilled n2's rank; the job was {failed.state} {time.monotonic() - killed_at:.1f} s later")
    assert failed.state == "FAILED"
    log = _log(project, "killed", job_id)
    assert re.search(r"srun: error: n2: task 1: (Exited with exit code|Killed)", log), log[-3000:]
    again = _submit(cluster, project, "killed")
    finished = cluster.wait_for(again, {"COMPLETED", "FAILED"}, RUN_TIMEOUT_S)
    log = _log(project, "killed", again)
    assert finished.state == "COMPLETED", log[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed and int(resumed.group(1)) >= CHECKPOINT_EVERY
    _assert_identical(uninterrupted, _weights(output_dir))


def test_an_array_job_builds_the_shards_of_one_task(cluster, tiny_corpus, tmp_path):
    """``launch/slurm_shards.sh`` with 3 array tasks and the dependent merge: byte-identical to one
    ``posttrain shards build`` with the same options."""
    options = ["--protocol", str(tiny_corpus.protocol), "--root", str(tiny_corpus.root),
               "--max-samples-per-shard", "2", "--seed", "3"]
    single = subprocess.run([str(BIN / "posttrain"), "shards", "build", "--out", str(tmp_path / "single"),
                             "--no-progress", *options], capture_output=True, text=True, timeout=120, env=_env(cluster))
    assert single.returncode == 0, single.stderr
    submitted = subprocess.run(["bash", str(REPO / "launch" / "slurm_shards.sh"), str(tmp_path / "array"), "3",
                                *options], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                               env=_env(cluster, POSTTRAIN_VENV=sys.prefix, SHARDS_CPUS="1"))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    build, merge = re.search(r"build array job (\d+) \(3 tasks\), merge job (\d+)", submitted.stdout).groups()
    for task in range(3):
        assert cluster.wait_for(f"{build}_{task}", {"COMPLETED", "FAILED"}, 120).state == "COMPLETED"
    assert cluster.wait_for(merge, {"COMPLETED", "FAILED", "CANCELLED"}, 120).state == "COMPLETED"
    logs = sorted(path.name for path in (tmp_path / "array" / "slurm").iterdir())
    assert logs == [f"build-{build}_{task}.log" for task in range(3)] + [f"merge-{merge}.log"]

    def files(root: Path) -> dict[str, bytes]:  # the shard set; not each task's own record, nor SLURM's logs
        return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
                if path.is_file() and "slurm" not in path.relative_to(root).parts
                and not path.name.startswith("index.task-")}

    single_files, array_files = files(tmp_path / "single"), files(tmp_path / "array")
    assert len([name for name in single_files if name.endswith(".tar")]) == 6
    assert single_files.keys() == array_files.keys()
    assert [name for name in single_files if single_files[name] != array_files[name]] == []
