"""Fine-tune a detector on Deepfake-Eval-2024 with accelerate + DeepSpeed, then test it per segment length and per file.

    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml finetune.py \
        --config configs/finetune/df2024.yaml [key=value ...]

The thin ``accelerate launch`` entry of ``posttrain finetune`` (``posttrain.commands.finetune``): the
same options, the same code, the same error contract.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from posttrain.commands import finetune
    from posttrain.errors import debug_requested, guarded

    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="exit codes: 0 done, 1 the work failed, 2 bad usage or input; "
                                            "--debug (or POSTTRAIN_DEBUG=1) shows the traceback of an error")
    finetune.configure(parser)
    args = parser.parse_args(argv)
    return guarded("finetune.py", lambda: finetune.run(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
