"""Fine-tune a detector on Deepfake-Eval-2024 with accelerate + DeepSpeed, then test it per segment length and per file.

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml finetune.py \
        --config configs/finetune/df2024.yaml [key=value ...]

The logic lives in ``posttrain.train.finetune``; this file only reads the command line.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from posttrain.errors import debug_requested, guarded

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit codes: 0 done, 1 the work failed, 2 bad usage or input; "
                                            "--debug (or POSTTRAIN_DEBUG=1) shows the traceback of an error")
    parser.add_argument("--config", required=True, help="fine-tune YAML (configs/finetune/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, values in YAML")
    args = parser.parse_args(argv)
    return guarded("finetune.py", lambda: run(args.config, args.overrides), debug=debug)


def run(config: str, overrides: list[str]) -> int:
    from posttrain.config import FinetuneConfig, load_config

    cfg = load_config(config, overrides, cls=FinetuneConfig)
    from posttrain.train.finetune import finetune  # after the config is valid: DeepSpeed picks its device on import

    finetune(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
