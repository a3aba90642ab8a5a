"""``posttrain serve MODEL_SPEC``: an HTTP service scoring uploads (``posttrain.serve.app``).

Without a token (``--token-file`` or ``POSTTRAIN_SERVE_TOKENS``) it listens on the loopback only,
unless ``--allow-public`` says otherwise. Tokens are never printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posttrain.serve.config import TOKENS_ENV, ServeConfig


def configure(parser: argparse.ArgumentParser) -> None:
    from posttrain.eval.inference import PRECISIONS

    d = ServeConfig(model="")
    parser.add_argument("model", metavar="MODEL_SPEC",
                        help="transformers export folder, posttrain checkpoint, AntiDeepfake release or hub id")
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=d.port, help="TCP port")
    parser.add_argument("--device", default=d.device, help="torch device of the model")
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="bf16: autocast on CUDA")
    parser.add_argument("--token-file", type=Path, default=None,
                        help=f"bearer tokens, one a line (also: {TOKENS_ENV}=a,b); default: no authentication")
    parser.add_argument("--allow-public", action="store_true",
                        help="listen beyond the loopback without tokens")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json (default: the one stored with the model, if any)")
    parser.add_argument("--window-seconds", type=float, default=d.window_seconds, help="timeline window length")
    parser.add_argument("--hop-seconds", type=float, default=d.hop_seconds, help="timeline hop")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                        help="largest upload, MiB (checked while it streams in)")
    parser.add_argument("--max-upload-seconds", type=float, default=d.max_upload_seconds,
                        help="longest audio per file (read from its header before decoding)")
    parser.add_argument("--max-batch-files", type=int, default=d.max_batch_files, help="files per batch request")
    parser.add_argument("--max-batch-seconds", type=float, default=d.max_batch_seconds,
                        help="padded audio seconds per forward pass")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="windows per forward pass")
    parser.add_argument("--max-batch-wait-ms", type=float, default=d.max_batch_wait_ms,
                        help="how long a forward pass waits for more windows")
    parser.add_argument("--max-inflight-seconds", type=float, default=d.max_inflight_seconds,
                        help="decoded audio seconds held at once")
    parser.add_argument("--max-queue", type=int, default=d.max_queue,
                        help="requests waiting for capacity before 503 + Retry-After")
    parser.add_argument("--queue-timeout-seconds", type=float, default=d.queue_timeout_seconds,
                        help="a queued request gets 503 after this wait")
    parser.add_argument("--temp-dir", type=Path, default=None,
                        help="where the service makes its temporary folder (default: the system's)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn log level")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    cfg = ServeConfig(model=args.model, host=args.host, port=args.port, device=args.device, precision=args.precision,
                      allow_public=args.allow_public, token_file=args.token_file, calibration=args.calibration,
                      window_seconds=args.window_seconds, hop_seconds=args.hop_seconds,
                      max_upload_bytes=int(args.max_upload_mb * 2**20), max_upload_seconds=args.max_upload_seconds,
                      max_batch_files=args.max_batch_files, max_batch_seconds=args.max_batch_seconds,
                      max_batch_size=args.max_batch_size, max_batch_wait_ms=args.max_batch_wait_ms,
                      max_inflight_seconds=args.max_inflight_seconds, max_queue=args.max_queue,
                      queue_timeout_seconds=args.queue_timeout_seconds, temp_dir=args.temp_dir).with_tokens()
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from posttrain.loading import load_model
    from posttrain.serve.app import create_app

    cfg = config_from_args(args)
    device = torch.device(cfg.device)
    model, identity = load_model(cfg.model, device)
    auth = f"{len(cfg.tokens)} bearer token(s)" if cfg.tokens else "no authentication"
    print(f"posttrain serve: {cfg.model} on http://{cfg.host}:{cfg.port} ({auth}; page at /, API at /docs)",
          flush=True)
    uvicorn.run(create_app(cfg, model, identity, device), host=cfg.host, port=cfg.port, log_level=args.log_level)
    return 0
