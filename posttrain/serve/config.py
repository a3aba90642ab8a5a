"""The typed configuration of ``posttrain serve``: every limit in its unit, validated at construction with
the dotted key, and the command's options derived from these fields (``cli_options``) so the two cannot
drift."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from posttrain.eval.metrics import OPERATING_POINTS as OPERATING_POINT_NAMES
from posttrain.eval.scoring import AGGREGATIONS, BACKENDS, PRECISIONS
from posttrain.select.embeddings import MANIFEST_NAME

TOKENS_ENV = "POSTTRAIN_SERVE_TOKENS"  # comma-separated bearer tokens (an alternative to a token file)
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _option(help_text: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
            unit_scale: float | None = None, cli: bool = True) -> dict[str, Any]:
    """A field's command-line metadata: its help, and where the flag differs from the field (``flag``,
    or a unit: ``--max-upload-mb`` sets ``max_upload_bytes`` through ``unit_scale`` 2**20)."""
    return {"help": help_text, "flag": flag, "choices": choices, "unit_scale": unit_scale, "cli": cli}


@dataclass(frozen=True)
class ServeConfig:
    model: str = field(metadata=_option("transformers export folder, posttrain checkpoint, AntiDeepfake release "
                                        "or hub id; an ONNX export folder with --backend onnxruntime", cli=False))
    host: str = field(default="127.0.0.1", metadata=_option("address to listen on"))
    port: int = field(default=8000, metadata=_option("TCP port"))
    device: str = field(default="cpu", metadata=_option("torch device of the model (the onnxruntime backends: cpu)"))
    precision: str = field(default="fp32", metadata=_option("bf16: autocast on CUDA", choices=PRECISIONS))
    backend: str = field(default="torch", metadata=_option(
        "onnxruntime: the model is an ONNX export folder (`posttrain export --format onnx`) run on the CPU in fp32; "
        "onnxruntime-int8: its model.int8.onnx", choices=BACKENDS))
    allow_public: bool = field(default=False, metadata=_option("listen beyond the loopback without tokens"))
    token_file: Path | None = field(default=None, metadata=_option(
        f"bearer tokens, one a line (also: {TOKENS_ENV}=a,b); default: no authentication"))
    calibration: Path | None = field(default=None, metadata=_option(
        "calibration.json (default: the one stored with the model, if any)"))
    operating_point: str | None = field(default=None, metadata=_option(
        "decide at this operating point of the calibration (fitted on its named dev split): eer, far1, frr1, "
        "min_dcf (default: the calibration's Bayes threshold)", choices=OPERATING_POINT_NAMES))
    window_seconds: float = field(default=4.0, metadata=_option("timeline window length"))
    hop_seconds: float = field(default=2.0, metadata=_option("timeline hop"))
    min_tail_seconds: float = field(default=1.0, metadata=_option(
        "a last window shorter than this is merged into the one before it"))
    min_window_seconds: float = field(default=1.0, metadata=_option(
        "shortest window_seconds a /v1/score request may ask (never below --min-tail-seconds)"))
    max_window_seconds: float | None = field(default=None, metadata=_option(
        "longest window_seconds a /v1/score request may ask (default: what one pass holds, "
        "--max-batch-seconds minus --min-tail-seconds)"))
    aggregation: str = field(default="mean_logits", metadata=_option("window outputs -> file output",
                                                                     choices=AGGREGATIONS))
    max_upload_bytes: int = field(default=32 * 2**20, metadata=_option(
        "largest upload per file, MiB (checked while it streams in, per file of a batch too)",
        flag="--max-upload-mb", unit_scale=2**20))
    max_upload_seconds: float = field(default=600.0, metadata=_option(
        "longest audio per file: decoding stops one frame past it (413), whatever the header says"))
    max_batch_files: int = field(default=16, metadata=_option("files per batch request"))
    max_batch_seconds: float = field(default=16.0, metadata=_option(
        "padded audio seconds per forward pass (small passes keep short requests fast on the CPU)"))
    max_batch_size: int = field(default=16, metadata=_option("windows per forward pass"))
    short_lane_seconds: float = field(default=4.0, metadata=_option(
        "clips of at most this many seconds are scored in a lane of their own, beside long files (0: one lane)"))
    max_batch_wait_ms: float = field(default=5.0, metadata=_option("how long a forward pass waits for more windows"))
    max_inflight_seconds: float = field(default=1200.0, metadata=_option(
        "decoded audio seconds admitted at once (bounds memory)"))
    max_queue: int = field(default=32, metadata=_option("requests waiting for capacity before 503 + Retry-After"))
    queue_timeout_seconds: float = field(default=30.0, metadata=_option("a queued request gets 503 after this wait"))
    retry_after_seconds: int = field(default=2, metadata=_option("the Retry-After of a 503"))
    decode_workers: int = field(default=2, metadata=_option(
        "files decoded at once (each decode holds at most --max-upload-seconds of audio)"))
    decode_timeout_seconds: float = field(default=60.0, metadata=_option(
        "a file whose decoding takes longer is refused (422 decode_timeout)"))
    read_timeout_seconds: float = field(default=30.0, metadata=_option(
        "a connection that sends no request line and headers, or no body bytes, for this long is closed (408)"))
    upload_timeout_seconds: float = field(default=300.0, metadata=_option(
        "a whole upload must arrive within this (a trickled body is cut: 408)"))
    shutdown_timeout_seconds: float = field(default=10.0, metadata=_option(
        "on SIGTERM, requests still running after this are cut and their files removed"))
    max_connections: int = field(default=256, metadata=_option("open connections at most; more are closed at once"))
    temp_dir: Path | None = field(default=None, metadata=_option(
        "where the service makes its temporary folder (created if missing; default: the system's); "
        "folders left there by a killed service are removed at start"))
    log_level: str = field(default="info", metadata=_option("log level of the service", choices=LOG_LEVELS))
    drift_reference: Path | None = field(default=None, metadata=_option(
        "embeddings folder (`posttrain drift` or `posttrain embed`, with this service's --window-seconds) the "
        "recent files' embeddings are compared with, at /v1/drift and /metrics; default: no drift monitoring"))
    drift_window_files: int = field(default=1000, metadata=_option(
        "the drift compares the embeddings of this many most recent files", flag="--drift-window"))
    drift_every_files: int = field(default=50, metadata=_option("the drift is recomputed after this many new files"))
    drift_every_seconds: float = field(default=30.0, metadata=_option(
        "... or this long after its last computation, when a file has arrived since"))
    tokens: tuple[str, ...] = field(default=(), repr=False, metadata=_option("from read_tokens(); never printed",
                                                                             cli=False))

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.model:
            raise ValueError("serve.model: a model spec is needed")
        for key, choices in (("precision", PRECISIONS), ("aggregation", AGGREGATIONS), ("log_level", LOG_LEVELS),
                             ("backend", BACKENDS)):
            if getattr(self, key) not in choices:
                raise ValueError(f"serve.{key}: {getattr(self, key)!r} is not one of {choices}")
        if self.backend != "torch" and self.device.split(":")[0] != "cpu":
            raise ValueError(f"serve.device: {self.device}: the {self.backend} backend runs on the CPU only; drop "
                             f"--device, or serve the torch model (--backend torch) on {self.device}")
        if self.backend != "torch" and self.precision != "fp32":
            raise ValueError(f"serve.precision: {self.precision}: the {self.backend} backend runs the exported fp32 "
                             f"graph; drop --precision")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port: must be in 1..65535, got {self.port}")
        for key in ("window_seconds", "hop_seconds", "max_upload_seconds", "max_batch_seconds",
                    "max_inflight_seconds", "queue_timeout_seconds", "decode_timeout_seconds", "read_timeout_seconds",
                    "upload_timeout_seconds", "shutdown_timeout_seconds", "drift_every_seconds"):
            if not getattr(self, key) > 0:
                raise ValueError(f"serve.{key}: must be > 0, got {getattr(self, key)}")
        if self.hop_seconds > self.window_seconds:
            raise ValueError(f"serve.hop_seconds: must be <= window_seconds ({self.window_seconds}), "
                             f"got {self.hop_seconds} (a larger hop would leave audio unscored)")
        for key in ("max_upload_bytes", "max_batch_files", "max_batch_size", "max_queue", "retry_after_seconds",
                    "decode_workers", "max_connections", "drift_every_files"):
            if getattr(self, key) < 1:
                raise ValueError(f"serve.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_batch_wait_ms", "min_tail_seconds", "short_lane_seconds"):
            if getattr(self, key) < 0:
                raise ValueError(f"serve.{key}: must be >= 0, got {getattr(self, key)}")
        if self.max_upload_seconds > self.max_inflight_seconds:
            raise ValueError(f"serve.max_upload_seconds ({self.max_upload_seconds}) must be <= "
                             f"serve.max_inflight_seconds ({self.max_inflight_seconds}), or a long upload could never run")
        if self.max_batch_seconds < self.window_seconds + self.min_tail_seconds:
            raise ValueError(f"serve.max_batch_seconds ({self.max_batch_seconds}) must hold one window "
                             f"(window_seconds + min_tail_seconds = {self.window_seconds + self.min_tail_seconds})")
        if not self.min_window_seconds > 0:
            raise ValueError(f"serve.min_window_seconds: must be > 0, got {self.min_window_seconds}")
        low, high = self.request_window_bounds()
        if self.max_window_seconds is not None and not low <= high <= self.max_batch_seconds - self.min_tail_seconds:
            raise ValueError(f"serve.max_window_seconds: must be >= {low:g} (min_window_seconds, min_tail_seconds) "
                             f"and fit one pass with its tail (<= max_batch_seconds - min_tail_seconds = "
                             f"{self.max_batch_seconds - self.min_tail_seconds:g}), got {high:g}")
        if self.drift_window_files < 2:
            raise ValueError(f"serve.drift_window_files: must be >= 2, got {self.drift_window_files}")
        if self.drift_reference is not None and not (Path(self.drift_reference) / MANIFEST_NAME).is_file():
            raise ValueError(f"serve.drift_reference: {self.drift_reference}: not an embeddings folder (no "
                             f"{MANIFEST_NAME}); write one with `posttrain drift` or `posttrain embed`")
        if not self.tokens and not self.allow_public and not is_loopback(self.host):
            raise ValueError(f"serve.host: {self.host} is reachable beyond this machine and no token is configured; "
                             f"give --token-file (or {TOKENS_ENV}) or --allow-public")

    def request_window_bounds(self) -> tuple[float, float]:
        """The ``window_seconds`` a request may ask: a window shorter than the tail rule's minimum would be
        merged with every following one (one window as long as the file), a longer one than a pass holds
        would make a pass as long as the request likes."""
        high = self.max_batch_seconds - self.min_tail_seconds if self.max_window_seconds is None \
            else self.max_window_seconds
        return max(self.min_window_seconds, self.min_tail_seconds), high


def read_tokens(token_file: Path | None) -> tuple[str, ...]:
    """The bearer tokens of ``token_file`` (one a line, ``#`` comments) and of ``POSTTRAIN_SERVE_TOKENS``."""
    tokens = [token.strip() for token in os.environ.get(TOKENS_ENV, "").split(",") if token.strip()]
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"serve.token_file: {token_file}: {error.strerror}") from None
        tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not tokens:
            raise ValueError(f"serve.token_file: {token_file}: no token in it")
    return tuple(tokens)


def cli_fields() -> list:
    """The fields a command-line option sets, in declaration order."""
    return [f for f in fields(ServeConfig) if f.metadata.get("cli", True)]


def flag_of(spec) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
