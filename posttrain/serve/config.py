"""The typed configuration of ``posttrain serve`` (every limit in its unit, validated with the dotted key)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

TOKENS_ENV = "POSTTRAIN_SERVE_TOKENS"  # comma-separated bearer tokens (an alternative to a token file)
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeConfig:
    model: str  # any model spec the loading facade accepts
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    precision: str = "fp32"  # bf16: autocast on CUDA (posttrain.eval.inference.PRECISIONS)
    allow_public: bool = False  # listen beyond the loopback without tokens (explicit opt-in)
    token_file: Path | None = None  # one bearer token a line; or POSTTRAIN_SERVE_TOKENS
    calibration: Path | None = None  # default: the one stored with the model
    window_seconds: float = 4.0  # timeline resolution: windows of this length...
    hop_seconds: float = 2.0  # ...every hop
    min_tail_seconds: float = 1.0
    aggregation: str = "mean_logits"
    max_upload_bytes: int = 32 * 2**20  # checked while the body streams in
    max_upload_seconds: float = 600.0  # checked from the container header, before decoding
    max_batch_files: int = 16
    max_batch_seconds: float = 64.0  # padded audio seconds per forward pass on the device
    max_batch_size: int = 16  # windows per forward pass
    max_batch_wait_ms: float = 10.0  # how long a forward pass waits for more windows to join
    max_inflight_seconds: float = 1200.0  # decoded audio admitted at once (bounds memory)
    max_queue: int = 32  # requests waiting for admission; beyond it: 503 + Retry-After
    queue_timeout_seconds: float = 30.0  # a queued request gives up (503) after this
    retry_after_seconds: int = 2
    temp_dir: Path | None = None  # the service's own temporary space (default: a fresh one, removed at exit)
    tokens: tuple[str, ...] = field(default=(), repr=False)  # resolved by with_tokens(); never printed

    def validate(self) -> None:
        if not self.model:
            raise ValueError("serve.model: a model spec is needed")
        from posttrain.eval.inference import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"serve.precision: {self.precision!r} is not one of {PRECISIONS}")
        if not 0 < self.port < 65536:
            raise ValueError(f"serve.port: must be in 1..65535, got {self.port}")
        for key in ("window_seconds", "hop_seconds", "max_upload_seconds", "max_batch_seconds",
                    "max_inflight_seconds", "queue_timeout_seconds"):
            if not getattr(self, key) > 0:
                raise ValueError(f"serve.{key}: must be > 0, got {getattr(self, key)}")
        if self.hop_seconds > self.window_seconds:
            raise ValueError(f"serve.hop_seconds: must be <= window_seconds ({self.window_seconds}), "
                             f"got {self.hop_seconds} (a larger hop would leave audio unscored)")
        for key in ("max_upload_bytes", "max_batch_files", "max_batch_size", "max_queue", "retry_after_seconds"):
            if getattr(self, key) < 1:
                raise ValueError(f"serve.{key}: must be >= 1, got {getattr(self, key)}")
        if self.max_batch_wait_ms < 0 or self.min_tail_seconds < 0:
            raise ValueError("serve.max_batch_wait_ms and serve.min_tail_seconds: must be >= 0")
        if self.max_upload_seconds > self.max_inflight_seconds:
            raise ValueError(f"serve.max_upload_seconds ({self.max_upload_seconds}) must be <= "
                             f"serve.max_inflight_seconds ({self.max_inflight_seconds}), or a long upload could never run")
        if self.max_batch_seconds < self.window_seconds + self.min_tail_seconds:
            raise ValueError(f"serve.max_batch_seconds ({self.max_batch_seconds}) must hold one window "
                             f"(window_seconds + min_tail_seconds = {self.window_seconds + self.min_tail_seconds})")
        if not self.tokens and not self.allow_public and not is_loopback(self.host):
            raise ValueError(f"serve.host: {self.host} is reachable beyond this machine and no token is configured; "
                             f"give --token-file (or {TOKENS_ENV}) or --allow-public")

    def with_tokens(self) -> "ServeConfig":
        """A copy holding the bearer tokens of ``token_file`` and the environment."""
        from dataclasses import replace

        tokens = [token.strip() for token in os.environ.get(TOKENS_ENV, "").split(",") if token.strip()]
        if self.token_file is not None:
            try:
                lines = Path(self.token_file).read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise ValueError(f"serve.token_file: {self.token_file}: {error.strerror}") from None
            tokens += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
            if not tokens:
                raise ValueError(f"serve.token_file: {self.token_file}: no token in it")
        return replace(self, tokens=tuple(tokens))


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
