"""``posttrain serve MODEL_SPEC``: an HTTP service scoring uploads (``posttrain.serve.app``).

Every option is a field of ``ServeConfig`` (``posttrain.serve.config``), derived from it here, so the
command and the config cannot drift. Without a token (``--token-file`` or ``POSTTRAIN_SERVE_TOKENS``) it
listens on the loopback only, unless ``--allow-public`` says otherwise. Tokens are never printed.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING
from pathlib import Path

from posttrain.serve.config import ServeConfig, cli_fields, flag_of, read_tokens


def _value_type(spec) -> type:
    hints = typing.get_type_hints(ServeConfig)
    kind = hints[spec.name]
    args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return args[0] if args else kind


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_SPEC",
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id; "
                             "an ONNX export folder with --backend onnxruntime")
    for spec in cli_fields():
        meta, kind = spec.metadata, _value_type(spec)
        if kind is bool:
            parser.add_argument(flag_of(spec), dest=spec.name, action="store_true", help=meta["help"])
            continue
        default = None if spec.default is MISSING else spec.default
        scale = meta.get("unit_scale")
        shown = default / scale if scale and default is not None else default
        parser.add_argument(flag_of(spec), dest=spec.name, type=float if scale else kind, default=shown,
                            choices=meta.get("choices"), help=f"{meta['help']} (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {"model": args.model}
    for spec in cli_fields():
        value, scale = getattr(args, spec.name), spec.metadata.get("unit_scale")
        values[spec.name] = int(value * scale) if scale and value is not None else value
    temp_dir = values["temp_dir"]
    if temp_dir is not None:
        try:
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"serve.temp_dir: {temp_dir}: cannot create it ({error.strerror}); give a writable "
                             f"--temp-dir") from None
    return ServeConfig(**values, tokens=read_tokens(values["token_file"]))


def run(args: argparse.Namespace) -> int:
    from posttrain.hubcache import locate_model

    cfg = config_from_args(args)
    locate_model(cfg.model)  # a missing model is one line and exit 2 before torch loads
    from posttrain.serve.app import serve

    return serve(cfg)
