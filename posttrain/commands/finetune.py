"""``posttrain finetune``: fine-tune a detector on Deepfake-Eval-2024, then test it per segment length and per file.

Run it on every rank; under ``accelerate launch`` use the root ``finetune.py``, which calls this same
code (accelerate launches a script, not a console command)::

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml finetune.py \\
        --config configs/finetune/df2024.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="fine-tune YAML (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values in YAML")


def run(args: argparse.Namespace) -> int:
    from posttrain.config import FinetuneConfig, load_config

    cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
    # imported after the config is valid: DeepSpeed picks its accelerator on import
    from posttrain.loading import load_model
    from posttrain.finetuning import finetune, format_summary

    from posttrain.dist import dist_info

    result = finetune(cfg, load_model)
    if dist_info().is_main:
        print(format_summary(result, cfg), flush=True)
    return 0
