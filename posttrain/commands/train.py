"""``posttrain train``: post-train a detector with DeepSpeed (run it on every rank: torchrun, SLURM)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML preset, e.g. configs/posttrain/xlsr_1b.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides with YAML values, e.g. train.max_steps=1000 optim.lr=1.0e-6")
    parser.add_argument("--preflight", action="store_true",
                        help="only check the run can start (config, shard sets, backbone in the offline cache), "
                             "print what was checked and exit: what launch/slurm_posttrain.sh runs before sbatch")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import load_config
    from posttrain.hubcache import hub_offline
    from posttrain.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    # the backbone must be in the cache when the job is offline (or asked); online, transformers downloads it
    checked = preflight(cfg, check_backbone=args.preflight or hub_offline())
    if args.preflight:
        print("\n".join(["preflight ok:", *(f"  {line}" for line in checked)]))
        return 0
    # imported after the config is valid: DeepSpeed picks its accelerator on import (see engine)
    from posttrain.dist import end_process_group
    from posttrain.train.trainer import train

    result = train(cfg)
    end_process_group()
    progress = result.progress
    best = "n/a" if progress.best_valid_eer is None else f"{100 * progress.best_valid_eer:.2f} %"
    print(f"trained {progress.step} steps ({progress.samples} samples, {progress.skipped_steps} skipped), "
          f"epoch {progress.epoch}; best validation EER {best}; last checkpoint {result.last_checkpoint}")
    if result.stopped is not None:
        print(f"stopped early on {result.stopped.signal} (received after step {result.stopped.received_after_step}); "
              f"the same command resumes from {result.last_checkpoint} (checkpoint.resume=auto)")
    return 0
