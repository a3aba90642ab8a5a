"""launch/slurm_posttrain.sh under fake ``sbatch``/``srun``/``scontrol`` that record what they get: the
checks before the queue, the dry run, and how every option becomes a flag or a rank's environment (the
real scheduler's partitions and accounts are not needed for that). A real torchrun (c10d rendezvous)
starts 2 ranks that join a gloo process group, in place of ``posttrain train`` (POSTTRAIN_TRAIN_CMD).
The scheduler itself (requeue, signals, two nodes) is tested for real in test_slurm_cluster.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB_ID = 4242

FAKE_SBATCH = r'''
import json, os, shutil, subprocess, sys
from pathlib import Path
record = Path(os.environ["FAKE_SLURM_RECORD"])
args = sys.argv[1:]
flags = [a for a in args if a.startswith("-")]
script, script_args = args[len(flags)], args[len(flags) + 1:]  # the script uses --key=value flags only
options = {}
for line in open(script):
    if line.startswith("#SBATCH "):
        key, _, value = line.split()[1].partition("=")
        options[key] = value
options.update(flag.partition("=")[::2] for flag in flags)
with open(record / "sbatch.jsonl", "a") as out:
    out.write(json.dumps({"argv": args, "options": options, "cwd": os.getcwd()}) + "\n")
job_id = os.environ.get("FAKE_JOB_ID", "4242")
env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOB_NAME=options["--job-name"], SLURM_JOB_NODELIST="localhost",
           SLURM_JOB_NUM_NODES=options["--nodes"], SLURM_NNODES=options["--nodes"], SLURM_SUBMIT_DIR=os.getcwd(),
           SLURM_CPUS_PER_TASK=options["--cpus-per-task"])
# like SLURM, run a spool copy of the script: it must not rely on its own location
spool = record / f"slurm_script_{job_id}"
shutil.copy(script, spool)
batch = subprocess.Popen(["bash", str(spool), *script_args], env=env, cwd=options.get("--chdir", os.getcwd()))
(record / "batch.pid").write_text(str(batch.pid))
print(f"Submitted batch job {job_id}")
sys.exit(batch.wait())
'''

FAKE_SRUN = r'''
import json, os, subprocess, sys
from pathlib import Path
record = Path(os.environ["FAKE_SLURM_RECORD"])
args = sys.argv[1:]
flags = [a for a in args if a.startswith("--")]
command = args[len(flags):]
with open(record / "srun.jsonl", "a") as out:
    out.write(json.dumps({"flags": flags, "command": command, "env": dict(os.environ)}) + "\n")
if os.environ.get("FAKE_SRUN_STOPS_AT_ONCE"):  # a run so short that it ends while the batch shell is in its trap
    import signal
    output_dir = Path(next(arg for arg in command if arg.startswith("output_dir=")).partition("=")[2])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "stopped.json").write_text('{"received_after_step": 2, "stopped_after_step": 3}')
    os.kill(os.getppid(), signal.SIGUSR1)
    sys.exit(0)
env = dict(os.environ, SLURM_PROCID="0", SLURM_NODEID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_STEP_ID="0")
sys.exit(subprocess.call(command, env=env))
'''

FAKE_SCONTROL = r'''
import os, sys
from pathlib import Path
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(sys.argv[3].split(",")))
else:
    with open(Path(os.environ["FAKE_SLURM_RECORD"]) / "scontrol.log", "a") as out:
        out.write(" ".join(sys.argv[1:]) + "\n")
'''

# stands in for `posttrain train`: one process per rank, joins the process group torchrun set up
RANK_RECORDER = r'''
import json, os, sys, time
from pathlib import Path
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "SLURM_JOB_ID",
        "SLURM_RESTART_COUNT"]
record = Path(os.environ["FAKE_SLURM_RECORD"])
(record / f"rank{dist.get_rank()}.json").write_text(json.dumps(
    {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}, "all_reduce": total.item()}))
release = os.environ.get("FAKE_RELEASE_FILE")
while release and not Path(release).exists():  # "training" until the test lets it finish
    time.sleep(0.1)
dist.destroy_process_group()
'''


@pytest.fixture
def slurm(tmp_path, monkeypatch, shard_dir):
    """A fake cluster: tools on PATH, a project root with two presets (training on ``shard_dir``), a
    record folder; the job activates the venv running these tests."""
    bin_dir, record, root = tmp_path / "bin", tmp_path / "record", tmp_path / "project"
    for folder in (bin_dir, record, root / "configs" / "posttrain"):
        folder.mkdir(parents=True)
    for name, source in {"sbatch": FAKE_SBATCH, "srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{source}")
        tool.chmod(0o755)
    (root / "launch").symlink_to(REPO / "launch")
    for preset in ("alpha", "beta"):
        (root / "configs" / "posttrain" / f"{preset}.yaml").write_text(
            f"model:\n  preset: tiny\ndata:\n  train:\n    shards: [{shard_dir}]\ntrain:\n  max_steps: 1\n")
    recorder = tmp_path / "record_rank.py"
    recorder.write_text(RANK_RECORDER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_RECORD", str(record))
    monkeypatch.setenv("POSTTRAIN_TRAIN_CMD", f"{sys.executable} {recorder}")
    monkeypatch.setenv("GPUS_PER_NODE", "2")  # CPU "GPUs": two gloo ranks
    monkeypatch.setenv("VENV", sys.prefix)
    for name in ("POSTTRAIN_ROOT", "SLURM_JOB_ID", "MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "OUTPUT_DIR"):
        monkeypatch.delenv(name, raising=False)
    return root, record


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ranks(record: Path) -> list[dict]:
    return [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)]


def _launch(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "launch" / "slurm_posttrain.sh"), *args], capture_output=True, text=True,
                          timeout=120, cwd=root, env={**os.environ, **env})


def test_dry_run_prints_the_submission_and_the_node_command_and_submits_nothing(slurm):
    root, record = slurm
    result = _launch(root, "--dry-run", "alpha", "optim.lr=0.5", NODES="2", PARTITION="gpu", ACCOUNT="speech")
    assert result.returncode == 0, result.stderr
    config = (root / "configs" / "posttrain" / "alpha.yaml").resolve()
    lines = result.stdout.splitlines()
    (sbatch,) = [line for line in lines if line.startswith("sbatch ")]
    for part in ("--job-name=posttrain-alpha", f"--chdir={root}", "--nodes=2", "--partition=gpu", "--account=speech",
                 f"{(REPO / 'launch' / 'slurm_posttrain.sh').resolve()} {config} optim.lr=0.5"):
        assert part in sbatch
    assert "#SBATCH --requeue" in lines and "#SBATCH --signal=B:USR1@180" in lines
    (torchrun,) = [line for line in lines if line.startswith("torchrun ")]
    assert torchrun.startswith("torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=")
    assert torchrun.endswith(f"--config {config} output_dir=runs/alpha/posttrain-alpha optim.lr=0.5")
    assert f"source {sys.prefix}/bin/activate" in lines
    assert "checkpoints: runs/alpha/posttrain-alpha/checkpoints" in result.stdout
    assert "preflight ok:" in result.stdout and "data.train.shards[0]" in result.stdout
    assert not (record / "sbatch.jsonl").exists()


@pytest.fixture(scope="module")
def one_class_valid(tmp_path_factory) -> Path:
    """A validation shard set of real samples only."""
    from conftest import write_corpus
    from posttrain.data.protocol import read_protocol, write_protocol
    from posttrain.data.shard_build import build_shards

    corpus = write_corpus(tmp_path_factory.mktemp("one_class"), "oneclass", num_files=4)
    rows = [row for row in read_protocol(corpus.protocol) if row.label == "real"]
    write_protocol([dataclasses.replace(row, proportion="valid") for row in rows], corpus.protocol)
    out = tmp_path_factory.mktemp("one_class_shards")
    build_shards([corpus.protocol], corpus.root, out, split="valid", progress=False)
    return out


@pytest.mark.parametrize("problem", ["missing shards", "one-class valid set", "backbone not cached", "no venv",
                                     "typo in an override"])
def test_pre_submit_checks_fail_before_sbatch(problem, slurm, tmp_path, one_class_valid):
    root, record = slurm
    args, env, message = {
        "missing shards": ([f"data.train.shards=[{tmp_path / 'absent'}]"], {},
                           f"data.train.shards[0]: {tmp_path / 'absent'}: no such shard folder"),
        "one-class valid set": ([f"data.valid.shards=[{one_class_valid}]"], {},
                                "data.valid.shards[0]: " f"{one_class_valid}: the validation set has no fake samples"),
        "backbone not cached": (["model.pretrained=nobody-t14b/absent-backbone"], {"HF_HOME": str(tmp_path / "hf")},
                                "`hf download nobody-t14b/absent-backbone`"),
        "no venv": ([], {"VENV": str(tmp_path / "no-venv")}, f"VENV={tmp_path / 'no-venv'}: no virtual environment"),
        "typo in an override": (["optim.lrr=1"], {}, "set on the command line by 'optim.lrr=1'"),
    }[problem]
    result = _launch(root, "alpha", *args, **env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (record / "sbatch.jsonl").exists()  # nothing reached the queue


def test_unknown_preset_fails_listing_presets(slurm):
    root, record = slurm
    result = subprocess.run(["bash", str(root / "launch" / "slurm_posttrain.sh"), "gamma"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown preset 'gamma'" in result.stderr
    assert "available presets: alpha beta" in result.stderr
    assert not (record / "sbatch.jsonl").exists()  # nothing was submitted


@pytest.mark.dist
def test_self_submit_flags_rendezvous_and_rank_environment(slurm, monkeypatch):
    root, record = slurm
    for name, value in {"NODES": "1", "CPUS_PER_TASK": "4", "TIME_LIMIT": "01:00:00", "PARTITION": "gpu",
                        "ACCOUNT": "speech", "SBATCH_ARGS": "--qos=high --exclusive"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = subprocess.run(["bash", str(root / "launch" / "slurm_posttrain.sh"), "alpha", "optim.lr=0.5"],
                            capture_output=True, text=True, timeout=120, cwd=root.parent)
    assert result.returncode == 0, result.stderr

    (submission,) = _jsonl(record / "sbatch.jsonl")
    config = str((root / "configs" / "posttrain" / "alpha.yaml").resolve())
    assert submission["argv"][-2:] == [config, "optim.lr=0.5"]
    options = submission["options"]
    assert options["--job-name"] == "posttrain-alpha" and options["--chdir"] == str(root)
    assert (options["--nodes"], options["--gpus-per-node"], options["--cpus-per-task"]) == ("1", "2", "4")
    assert (options["--time"], options["--partition"], options["--account"]) == ("01:00:00", "gpu", "speech")
    assert "--qos=high" in submission["argv"] and "--exclusive" in submission["argv"]
    assert options["--requeue"] == "" and options["--signal"] == "B:USR1@180"
    assert options["--output"] == "logs/%x-%j.out" and (root / "logs").is_dir()

    (step,) = _jsonl(record / "srun.jsonl")
    assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=4"} <= set(step["flags"])
    port = str(20000 + JOB_ID % 20000)
    assert (step["env"]["MASTER_ADDR"], step["env"]["MASTER_PORT"], step["env"]["NNODES"]) == ("localhost", port, "1")
    torchrun = step["command"][2]
    for argument in ('--rdzv-backend=c10d', '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                     '--rdzv-id="$SLURM_JOB_ID"', '--nnodes="$NNODES"', '--nproc-per-node="$GPUS_PER_NODE"'):
        assert argument in torchrun

    ranks = _ranks(record)
    for rank, seen in enumerate(ranks):
        env = seen["env"]
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "2", "2")
        assert env["GROUP_RANK"] == "0" and env["TORCHELASTIC_RUN_ID"] == str(JOB_ID)
        assert env["OMP_NUM_THREADS"] == "2"  # 4 CPUs / 2 ranks
        assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert seen["argv"] == ["--config", config, "output_dir=runs/alpha/posttrain-alpha", "optim.lr=0.5"]
        assert seen["all_reduce"] == 1 + 2  # both ranks joined one process group


def test_a_run_that_ends_during_the_usr1_trap_is_requeued_not_failed(slurm, tmp_path, monkeypatch):
    """USR1 interrupts the batch shell's `wait`; srun may end before the trap returns. Its status must be
    srun's (0), not the interrupted wait's (138), or a run stopped for the time limit fails instead of
    being requeued. A slow `date` (the trap's first command) holds the trap until srun is gone."""
    root, record = slurm
    slow_date = tmp_path / "bin" / "date"
    slow_date.write_text("#!/bin/bash\nsleep 1\nexec /bin/date \"$@\"\n")
    slow_date.chmod(0o755)
    result = _launch(root, "alpha", NODES="1", FAKE_SRUN_STOPS_AT_ONCE="1")
    assert result.returncode == 0, result.stderr
    assert "requeueing job 4242" in result.stderr
    assert (record / "scontrol.log").read_text().splitlines()[-1] == "requeue 4242"
