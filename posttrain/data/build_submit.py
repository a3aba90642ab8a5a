"""Distributed shard builds through submitit: N independent build tasks, then one merge.

The shard plan depends only on the protocol CSVs and the build options, so task i of N builds its
slice of the plan without talking to the others (``posttrain.data.shard_build``). Here the N tasks
become a submitit job array -- a SLURM array (``--submitit-array N``) followed by a merge job that
starts once every task succeeded (``afterok`` dependency), or N local processes under submitit's
``LocalExecutor`` (``--local-tasks N``) merged when they are done. A failed task is re-run alone with
``posttrain shards build ... --task-index i --num-tasks N`` (it skips its finished shards), then
``posttrain shards merge OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

if TYPE_CHECKING:
    from posttrain.data.shard_plan import BuildOptions

SUBMITIT_DIR = ".submitit"
DEFAULT_TIMEOUT_MIN = 240


def run_task(protocols: list[str], root: str | None, out: str, options: BuildOptions) -> str:
    """One build task (runs inside a submitit job); returns its partial index path."""
    import torch

    from posttrain.data.shard_build import build_task

    torch.set_num_threads(1)  # the task's worker processes, not intra-op threads, use its cores
    return str(build_task(protocols, root, out, options))


def run_merge(out: str) -> dict[str, Any]:
    """The merge job: per-task indexes -> index.json; returns the index totals."""
    from posttrain.data.shard_build import merge

    return merge(out)["totals"]


def task_options(options: BuildOptions, num_tasks: int) -> list[BuildOptions]:
    if num_tasks < 1:
        raise ValueError(f"the number of build tasks must be >= 1, got {num_tasks}")
    return [dataclasses.replace(options, task_index=i, num_tasks=num_tasks, progress=False) for i in range(num_tasks)]


def submit_tasks(executor: submitit.Executor, protocols: list[str], root: str | None, out: str | Path,
                 options: BuildOptions, num_tasks: int) -> list[submitit.Job]:
    """Submit the N build tasks as one job array."""
    per_task = task_options(options, num_tasks)
    protocols = [str(path) for path in protocols]
    return executor.map_array(run_task, [protocols] * num_tasks, [root] * num_tasks, [str(out)] * num_tasks,
                              per_task)


def _rerun_hint(out: str | Path, num_tasks: int) -> str:
    return (f"re-run task I alone with `posttrain shards build <same arguments> --task-index I --num-tasks "
            f"{num_tasks}` (it skips its finished shards), then `posttrain shards merge {out}`")


def build_local(protocols: list[str], root: str | None, out: str | Path, options: BuildOptions, num_tasks: int,
                *, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> dict[str, Any]:
    """Run the N tasks as local processes (submitit ``LocalExecutor``), wait, merge; returns the index."""
    from posttrain.data.shard_build import merge
    from posttrain.data.shard_plan import ShardBuildError

    out = Path(out)
    executor = submitit.LocalExecutor(folder=out / SUBMITIT_DIR / "%j")
    executor.update_parameters(timeout_min=timeout_min)
    jobs = submit_tasks(executor, protocols, root, out, options, num_tasks)
    failed = []
    for index, job in enumerate(jobs):
        try:
            job.result()
        except Exception as error:  # a task's exception arrives wrapped by submitit (FailedJobError etc.)
            failed.append(index)
            print(f"build task {index} of {num_tasks} failed (logs: {job.paths.stderr}): {error}")
    if failed:
        raise ShardBuildError(f"build task(s) {failed} of {num_tasks} failed; {_rerun_hint(out, num_tasks)}")
    return merge(out)


@dataclass
class SlurmSubmission:
    array_job_id: str
    task_job_ids: list[str]
    merge_job_id: str
    log_folder: str


def submit_slurm(protocols: list[str], root: str | None, out: str | Path, options: BuildOptions, num_tasks: int,
                 *, partition: str | None = None, timeout_min: float = DEFAULT_TIMEOUT_MIN,
                 cpus_per_task: int | None = None) -> SlurmSubmission:
    """Submit the N tasks as a SLURM array and a merge job that runs after all of them succeeded."""
    out = Path(out)
    executor = submitit.AutoExecutor(folder=out / SUBMITIT_DIR / "%j", cluster="slurm")
    common = {"timeout_min": timeout_min, **({"slurm_partition": partition} if partition else {})}
    executor.update_parameters(name="shards-build", cpus_per_task=cpus_per_task or options.num_workers,
                               slurm_array_parallelism=num_tasks, **common)
    jobs = submit_tasks(executor, protocols, root, out, options, num_tasks)
    array_job_id = jobs[0].job_id.split("_")[0]  # array tasks are "<array id>_<index>"
    executor.update_parameters(name="shards-merge", cpus_per_task=1,
                               slurm_additional_parameters={"dependency": f"afterok:{array_job_id}"}, **common)
    merge_job = executor.submit(run_merge, str(out))
    return SlurmSubmission(array_job_id, [job.job_id for job in jobs], merge_job.job_id,
                           str(out / SUBMITIT_DIR))


# ------------------------------------------------------------------------------ command-line options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The submitit options of ``posttrain shards build``."""
    group = parser.add_argument_group("distributed build (submitit)")
    how = group.add_mutually_exclusive_group()
    how.add_argument("--submitit-array", type=int, default=None, metavar="N",
                     help="submit N build tasks as a SLURM job array plus a merge job that waits for them")
    how.add_argument("--local-tasks", type=int, default=None, metavar="N",
                     help="run N build tasks as local processes (submitit LocalExecutor), then merge")
    group.add_argument("--slurm-partition", default=None, help="SLURM partition of the array and merge jobs")
    group.add_argument("--timeout-min", type=float, default=DEFAULT_TIMEOUT_MIN, help="time limit per task (minutes)")


def submitted(args: argparse.Namespace) -> bool:
    return args.submitit_array is not None or args.local_tasks is not None


def run_submitted(args: argparse.Namespace, protocols: list[str], options: BuildOptions) -> int:
    """Dispatch ``--local-tasks`` / ``--submitit-array``; prints what happened, returns the exit code."""
    from posttrain.data.shards import format_index

    if options.num_tasks != 1:
        raise ValueError("--task-index/--num-tasks re-run one task; they do not combine with "
                         "--local-tasks/--submitit-array")
    if args.local_tasks is not None:
        print(format_index(build_local(protocols, args.root, args.out, options, args.local_tasks,
                                       timeout_min=args.timeout_min), args.out))
        return 0
    submission = submit_slurm(protocols, args.root, args.out, options, args.submitit_array,
                              partition=args.slurm_partition, timeout_min=args.timeout_min)
    print(f"submitted build array {submission.array_job_id} ({args.submitit_array} tasks) and merge job "
          f"{submission.merge_job_id} (afterok); logs in {submission.log_folder}. If a task fails, "
          f"{_rerun_hint(args.out, args.submitit_array)}")
    return 0
