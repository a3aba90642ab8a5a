"""Fine-tune a detector on Deepfake-Eval-2024 with accelerate + DeepSpeed, then test it per segment length and per file.

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml finetune.py \
        --config configs/finetune/df2024.yaml [key=value ...]

The logic lives in ``posttrain.train.finetune``; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="fine-tune YAML (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values in YAML")
    args = parser.parse_args(argv)

    from posttrain.config import FinetuneConfig, load_config
    from posttrain.train.finetune import finetune

    try:
        cfg = load_config(args.config, args.overrides, cls=FinetuneConfig)
    except (ValueError, FileNotFoundError) as error:
        print(f"finetune.py: error: {error}", file=sys.stderr)
        return 2
    finetune(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
