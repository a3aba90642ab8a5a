"""Submit post-training through submitit: SLURM, or this machine with ``--local`` (LocalExecutor).

    python launch/submit.py xlsr_2b --nodes 4 --gpus-per-node 8 --partition gpu [key=value ...]
    python launch/submit.py demo --local --gpus-per-node 2 train.device=cpu

submitit starts one task per GPU (no torchrun); each task exports the torch.distributed variables
from the SLURM (or local) job environment, with the first node's address as SLURM reaches it
(``NodeAddr``: its name need not resolve), and runs ``posttrain.train.trainer.train``.

Near the time limit (or on a preemption announced with it) SLURM signals every task with submitit's
signal (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise; ``--signal-delay-s`` ahead). submitit's
own handler would call ``checkpoint()`` on global rank 0 alone, inside the handler, where a collective
save would hang. So for the run the trainer's handler takes the signal on every rank (it is the run's
``checkpoint.stop_signal``): the ranks agree on it at the end of the step, write one collective
checkpoint and stop; only then does rank 0 hand over to submitit's handler, which calls
``checkpoint()`` (a resubmission of the same callable) and requeues. The requeued job resumes from
``<output_dir>/checkpoints/latest`` (``checkpoint.resume=auto``), so the output directory must stay the
same: it is fixed here, at submission.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs" / "posttrain"


def resolve_config(preset: str, config_dir: Path = CONFIG_DIR) -> Path:
    """``configs/posttrain/PRESET.yaml`` (or an existing .yaml path); an unknown preset raises,
    listing the available ones."""
    path = Path(preset)
    if path.suffix == ".yaml" and path.is_file():
        return path.resolve()
    path = config_dir / f"{preset}.yaml"
    if path.is_file():
        return path.resolve()
    available = sorted(p.stem for p in config_dir.glob("*.yaml"))
    raise FileNotFoundError(f"unknown preset {preset!r}: no {path}; available presets: "
                            f"{', '.join(available) or '(none)'}")


class PosttrainJob(submitit.helpers.Checkpointable):
    """One task of a post-training job (one per GPU); picklable, resubmitted as-is on requeue."""

    def __init__(self, config_path: str, overrides: list[str]):
        self.config_path = config_path
        self.overrides = list(overrides)

    def __call__(self) -> Any:
        # Keep every GPU visible: the default (one GPU per task) leaves LOCAL_RANK > 0 pointing at a
        # device the task cannot see, which breaks torch.cuda.set_device(LOCAL_RANK).
        environment = submitit.helpers.TorchDistributedEnvironment()
        environment.export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MASTER_ADDR"] = node_address(environment.master_addr)
        return self.train()

    def train(self) -> Any:
        from posttrain import console
        from posttrain.config import load_config
        from posttrain.dist import end_process_group
        from posttrain.train.trainer import train

        console.configure()  # the job's log says what `posttrain train` says: its resume point, its checkpoints
        cfg = load_config(self.config_path, self.overrides)
        result = train(cfg)
        end_process_group()  # as `posttrain train` does: no rank leaves while another's group is up
        if result.stopped is not None and os.environ.get("RANK") == "0":
            # the collective checkpoint is written: submitit's handler (back in place) requeues and exits
            stop_signal = signal.Signals[result.stopped.signal]
            signal.getsignal(stop_signal)(stop_signal, None)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # Runs on rank 0 only, inside a signal handler: a collective save here would hang. Requeue only.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def node_address(node: str) -> str:
    """The address SLURM reaches ``node`` at (its ``NodeAddr``); the name itself outside a SLURM job or
    when scontrol does not know it."""
    if "SLURM_JOB_ID" not in os.environ:
        return node
    try:
        shown = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return node
    match = re.search(r"NodeAddr=(\S+)", shown.stdout)
    return match.group(1) if shown.returncode == 0 and match else node


def stop_signal_override() -> str:
    """The run's stop signal is the one submitit asks SLURM to send (its ``--signal``)."""
    return f"checkpoint.stop_signal=SIG{submitit.JobEnvironment.USR_SIG}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="configs/posttrain/PRESET.yaml, or a path to a .yaml")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-6")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: %(default)s)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="processes per node; default one per GPU (1 without GPU)")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per task (default: %(default)s)")
    parser.add_argument("--timeout-min", type=int, default=48 * 60, help="time limit, minutes (default: %(default)s)")
    parser.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    parser.add_argument("--account", default=None, help="SLURM account (default: yours)")
    parser.add_argument("--job-name", default=None, help="default posttrain-PRESET")
    parser.add_argument("--output-dir", default=None, help="default runs/PRESET/JOB_NAME (stable across requeues)")
    parser.add_argument("--signal-delay-s", type=int, default=180,
                        help="requeue signal lead time before the limit (default: %(default)s)")
    parser.add_argument("--max-requeues", type=int, default=10,
                        help="timeouts/preemptions resubmitted (default: %(default)s)")
    parser.add_argument("--logs", default="logs/submitit",
                        help="submitit's folder (pickles, logs; default: %(default)s)")
    parser.add_argument("--local", action="store_true", help="run on this machine (submitit LocalExecutor)")
    # overrides may come before, between or after the options (the usage above puts them last)
    return parser.parse_intermixed_args(argv)


def make_executor(args: argparse.Namespace, job_name: str) -> submitit.AutoExecutor:
    """SLURM (or, with ``--local``, this machine): one task per GPU on each node."""
    executor = submitit.AutoExecutor(folder=Path(args.logs) / job_name / "%j", cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    additional = {"account": args.account} if args.account else {}
    executor.update_parameters(
        name=job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node or max(args.gpus_per_node, 1),
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, timeout_min=args.timeout_min,
        slurm_partition=args.partition, slurm_additional_parameters=additional,
        slurm_signal_delay_s=args.signal_delay_s)
    return executor


def check_before_submit(job: PosttrainJob) -> str | None:
    """What ``posttrain train --preflight`` checks (config, shard sets, the backbone when offline), here,
    before the queue; the problem as one line, or None."""
    from posttrain.config import load_config
    from posttrain.errors import INPUT_ERRORS, one_line
    from posttrain.hubcache import hub_offline
    from posttrain.train.preflight import preflight

    try:
        preflight(load_config(job.config_path, job.overrides), check_backbone=hub_offline())
    except INPUT_ERRORS as error:
        return one_line(error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = resolve_config(args.preset)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    job_name = args.job_name or f"posttrain-{config.stem}"
    output_dir = args.output_dir or str(Path("runs") / config.stem / job_name)
    # submission-time overrides first, so the user's own output_dir=... still wins
    job = PosttrainJob(str(config), [f"output_dir={Path(output_dir).resolve()}", stop_signal_override(),
                                     *args.overrides])
    problem = check_before_submit(job)
    if problem:
        print(f"launch/submit.py: error: {problem}", file=sys.stderr)
        return 2
    if args.gpus_per_node == 0:  # CPU processes: DeepSpeed's CPU accelerator (gloo)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    submitted = make_executor(args, job_name).submit(job)
    print(f"submitted {job_name} as job {submitted.job_id}: config {config}, output {output_dir}")
    if args.local:  # the local executor's tasks die with this process: wait for them
        submitted.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())
