"""``posttrain shards build``: protocol CSVs -> WebDataset shards + index.json (one task or all)."""

from __future__ import annotations

import argparse
import os


def _slurm_array_task() -> tuple[int, int] | None:
    """(task index, task count) of a SLURM array job, counted from the array's first id."""
    if "SLURM_ARRAY_TASK_ID" not in os.environ or "SLURM_ARRAY_TASK_COUNT" not in os.environ:
        return None
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    return int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])


def add_split_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--split`` / ``--mixed-proportions``: which protocol rows (by ``Proportion``) a shard set keeps."""
    parser.add_argument("--split", choices=("train", "valid", "test"), default=None,
                        help="keep the protocol rows whose Proportion is this split (one shard set per split"
                             f"{'; ' + note if note else ''}). Without it, rows spanning several proportions "
                             "are refused (default: none)")
    parser.add_argument("--mixed-proportions", action="store_true",
                        help="keep rows of every Proportion in one set, test rows included (default: off)")


def split_options(args: argparse.Namespace) -> dict:
    """The build options of ``add_split_arguments``: ``split`` and ``proportions``."""
    from posttrain.data.protocol import PROPORTIONS

    if args.split and args.mixed_proportions:
        raise ValueError("--split keeps one proportion, --mixed-proportions keeps them all: give one of them")
    return {"split": args.split, "proportions": PROPORTIONS if args.mixed_proportions else None}


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--protocol", nargs="+", help="protocol CSV(s)")
    source.add_argument("--mix", default=None, help="a mix definition (shards/*.yaml) instead of --protocol; "
                                                    "--root is then its data root")
    add_split_arguments(parser, "with --mix: the mix's train or valid split, default train")
    parser.add_argument("--root", default=None, help="data root replacing $ROOT in the CSV paths")
    parser.add_argument("--out", required=True, help="shard directory to write")
    parser.add_argument("--name", default=None, help="shard file prefix: <name>-000000.tar (default: the split)")
    parser.add_argument("--max-samples-per-shard", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-shard-mb", type=float, default=1000.0, help="size bound per shard (10^6 bytes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the global shuffle before sharding")
    parser.add_argument("--workers", type=int, default=1, help="processes, each building whole shards")
    parser.add_argument("--strict", action="store_true", help="fail on any rejected audio instead of skipping it")
    parser.add_argument("--min-seconds", type=float, default=0.1, help="shorter audio is rejected")
    from posttrain.data.shard_plan import DEFAULT_DURATION_TOLERANCE_S

    parser.add_argument("--duration-tolerance-s", type=float, default=DEFAULT_DURATION_TOLERANCE_S,
                        help="decoded audio differing from the protocol's Duration by more than this (+0.1 %%) is "
                             "rejected as duration_mismatch")
    parser.add_argument("--task-index", type=int, default=None,
                        help="this task of a split build (default: SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="tasks of a split build (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true",
                        help="read the CSVs, select the split and plan the shards, then stop: what would be built, "
                             "or the error a build would stop with (launch/slurm_shards.sh runs it before sbatch)")
    from posttrain.data import build_submit

    build_submit.add_arguments(parser)


def _mix_protocol(args: argparse.Namespace) -> tuple[list[str], dict]:
    """One split of a mix written as one protocol CSV in the output folder (what the tasks read), and
    the build options that select it: the proportions the mix declares for that split."""
    from posttrain.data.mix import load_mix, split_proportions, write_mix_protocol

    if args.root is None:
        raise ValueError("--mix needs --root (the data root of the mix)")
    if args.split not in (None, "train", "valid") or args.mixed_proportions:
        raise ValueError("--mix builds its own train or valid split (the proportions its YAML declares); "
                         "--split test and --mixed-proportions apply to --protocol")
    split = args.split or "train"
    mix = load_mix(args.mix)
    out = os.path.join(args.out, f"protocol.{split}.csv")
    return ([str(write_mix_protocol(mix, args.root, split, out))],
            {"split": split, "proportions": split_proportions(mix, split)})


def _selection(args: argparse.Namespace) -> tuple[list[str], dict]:
    """Protocol CSVs and the proportion options (``--split`` or ``--mixed-proportions``) of the build."""
    return _mix_protocol(args) if args.mix else (args.protocol, split_options(args))


def _check(protocols: list[str], options) -> int:
    from posttrain.data.shard_build import plan_build

    options, split, specs = plan_build(protocols, options)
    rows = sum(len(spec.rows) for spec in specs)
    print(f"check: {rows} rows, split {split or 'unassigned'}, {len(specs)} shards "
          f"({options.prefix}-000000.tar ...); nothing written")
    return 0


def run(args: argparse.Namespace) -> int:
    from posttrain.data.shard_build import build_shards
    from posttrain.data.shards import format_index

    slurm = _slurm_array_task() or (0, 1)
    task_index = slurm[0] if args.task_index is None else args.task_index
    num_tasks = slurm[1] if args.num_tasks is None else args.num_tasks
    from posttrain.data import build_submit
    from posttrain.data.shard_plan import BuildOptions

    options = dict(name=args.name, max_samples_per_shard=args.max_samples_per_shard, max_shard_mb=args.max_shard_mb,
                   seed=args.seed, num_workers=args.workers, strict=args.strict, min_seconds=args.min_seconds,
                   duration_tolerance_s=args.duration_tolerance_s,
                   task_index=task_index, num_tasks=num_tasks, progress=not args.no_progress)
    protocols, selection = _selection(args)
    options.update(selection)
    if args.check:
        return _check(protocols, BuildOptions(**options))
    if build_submit.submitted(args):
        return build_submit.run_submitted(args, protocols, BuildOptions(**options))
    index = build_shards(protocols, args.root, args.out, **options)
    if index is None:
        print(f"task {task_index} of {num_tasks} done; run `posttrain shards merge {args.out}` after all tasks")
    else:
        print(format_index(index, args.out))
    return 0
