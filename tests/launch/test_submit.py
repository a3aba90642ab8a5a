"""launch/submit.py: preset resolution, the Checkpointable's requeue contract, and real submissions
through submitit's LocalExecutor (separate processes, submitit's own job environment)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("posttrain_submit", REPO / "launch" / "submit.py")
submit = importlib.util.module_from_spec(_spec)
sys.modules["posttrain_submit"] = submit
_spec.loader.exec_module(submit)
# the jobs below are pickled into other processes that cannot import these modules by name
cloudpickle.register_pickle_by_value(submit)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordingJob(submit.PosttrainJob):
    """The real ``__call__`` (environment export), then a gloo all-reduce instead of training."""

    def train(self):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")  # env:// from the exported variables
        total = torch.tensor([dist.get_rank() + 1])
        dist.all_reduce(total)
        dist.destroy_process_group()
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
        return {"env": {key: os.environ.get(key) for key in keys}, "all_reduce": int(total),
                "config": self.config_path, "overrides": self.overrides}


def _write_presets(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        (folder / f"{name}.yaml").write_text("train:\n  max_steps: 1\n")
    return folder


def test_resolve_config(tmp_path):
    folder = _write_presets(tmp_path / "configs", ("xlsr_2b", "demo"))
    assert submit.resolve_config("xlsr_2b", folder) == (folder / "xlsr_2b.yaml").resolve()
    assert submit.resolve_config(str(folder / "demo.yaml"), tmp_path / "elsewhere") == (folder / "demo.yaml").resolve()
    with pytest.raises(FileNotFoundError, match=r"unknown preset 'xlsr_3b'.*available presets: demo, xlsr_2b"):
        submit.resolve_config("xlsr_3b", folder)


def test_unknown_preset_exits_2_listing_presets(capsys):
    assert submit.main(["no_such_preset", "--local"]) == 2
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err


def test_a_run_that_cannot_start_is_refused_before_submission(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write_presets(tmp_path / "configs", ("alpha",)) / "alpha.yaml"
    absent = tmp_path / "absent"
    assert submit.main([str(config), f"data.train.shards=[{absent}]", "--local"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launch/submit.py: error: data.train.shards[0]: {absent}: no such shard folder")
    assert not (tmp_path / "logs").exists()  # nothing was handed to submitit


def test_checkpoint_only_resubmits_the_same_callable():
    job = submit.PosttrainJob("/configs/xlsr_2b.yaml", ["output_dir=/runs/x", "optim.lr=1e-6"])
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    # what submitit pickles for the requeued job carries the same arguments
    requeued = pickle.loads(cloudpickle.dumps(delayed)).function
    assert type(requeued).__name__ == "PosttrainJob"
    assert (requeued.config_path, requeued.overrides) == (job.config_path, job.overrides)


def test_the_documented_usage_lines_parse_with_overrides_anywhere():
    """The module doc's own usage lines (overrides after the options), and overrides in between."""
    usage = [line.split("submit.py", 1)[1].split() for line in submit.__doc__.splitlines()
             if line.strip().startswith("python launch/submit.py")]
    assert len(usage) == 2
    first = submit.parse_args(usage[0])
    assert (first.preset, first.nodes, first.gpus_per_node, first.partition) == ("xlsr_2b", 4, 8, "gpu")
    assert first.overrides == ["[key=value", "...]"]  # the placeholder, parsed as overrides like any others
    second = submit.parse_args(usage[1])
    assert (second.preset, second.local, second.gpus_per_node, second.overrides) == ("demo", True, 2,
                                                                                       ["train.device=cpu"])
    mixed = submit.parse_args(["demo", "optim.lr=1e-5", "--nodes", "2", "train.max_steps=9", "--local"])
    assert (mixed.nodes, mixed.local, mixed.overrides) == (2, True, ["optim.lr=1e-5", "train.max_steps=9"])


def test_the_stop_signal_is_the_one_submitit_asks_slurm_for():
    from posttrain.config import load_config

    override = submit.stop_signal_override()
    assert override == f"checkpoint.stop_signal=SIG{submitit.JobEnvironment.USR_SIG}"
    assert load_config(None, [override]).checkpoint.stop_signal == "SIGUSR2"


def test_slurm_executor_parameters(tmp_path, monkeypatch):
    # SlurmExecutor only checks that srun exists; nothing is submitted
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    args = submit.parse_args(["xlsr_2b", "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "12",
                              "--partition", "gpu", "--account", "speech", "--timeout-min", "600",
                              "--logs", str(tmp_path / "logs")])
    executor = submit.make_executor(args, "posttrain-xlsr_2b")
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--partition=gpu", "--account=speech", "--time=600", "--signal=USR2@180",
                 "--job-name=posttrain-xlsr_2b"):
        assert f"#SBATCH {line}\n" in sbatch, line


@pytest.mark.dist
def test_local_submission_exports_the_distributed_environment(tmp_path, monkeypatch):
    config = _write_presets(tmp_path / "configs", ("demo",)) / "demo.yaml"
    monkeypatch.delenv("MASTER_PORT", raising=False)
    args = submit.parse_args([str(config), "--local", "--gpus-per-node", "0", "--tasks-per-node", "2",
                              "--timeout-min", "5", "--logs", str(tmp_path / "logs")])
    job = submit.make_executor(args, "posttrain-demo").submit(RecordingJob(str(config), ["optim.lr=0.5"]))
    results = job.results()
    assert [r["env"]["RANK"] for r in results] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in results] == ["0", "1"]
    for result in results:
        assert result["env"]["WORLD_SIZE"] == "2" and result["env"]["MASTER_ADDR"]
        assert result["env"]["MASTER_PORT"] == results[0]["env"]["MASTER_PORT"]
        # the controller hides GPUs (none requested) and export() must leave that as it is,
        # not narrow it to the local rank
        assert result["env"]["CUDA_VISIBLE_DEVICES"] == ""
        assert result["all_reduce"] == 1 + 2
        assert (result["config"], result["overrides"]) == (str(config), ["optim.lr=0.5"])
    assert json.dumps(results)  # plain data came back through submitit's pickles
