"""The request options of ``POST /v1/score``: which region of the upload to score, and with which window.

``start_seconds``, ``end_seconds``
    Score only ``[start, end)`` of the decoded audio, as if that slice had been uploaded alone. The region
    is cut after the bounded decode: the whole upload is still decoded under ``--max-upload-seconds`` and
    admitted for its length, so a region never lets a request hold or compute more than a whole upload
    would. ``start`` must lie in the file (``>= 0`` and ``<`` its duration); ``end`` must be ``> start``;
    an ``end`` past the file's end is cut to it. The region used is reported, in seconds, in whole samples.
``window_seconds``
    The scoring (and timeline) window, within the service's bounds (``ServiceState.window_bounds``:
    ``--min-window-seconds`` .. ``--max-window-seconds``, which default to what one forward pass holds).
    The hop keeps the service's overlap (``hop = window * hop_seconds / window_seconds``), so a request
    computes the same audio per second as the default windows; the tail rule is the service's.

Given as query parameters (raw or multipart uploads) or as text fields of the multipart form; a name given
twice is refused, unknown names are ignored. Every refusal is HTTP 422 ``invalid_option`` naming the
field. With no option the request is scored exactly as before and the answer carries no ``region`` /
``window``; with any, the answer says the region (``start_seconds``, ``end_seconds``) and window
(``window_seconds``, ``hop_seconds``) used, and the timeline's times are the uploaded file's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.scoring import WindowConfig
from posttrain.serve.receive import RequestError

OPTION_NAMES = ("start_seconds", "end_seconds", "window_seconds")
_MEANINGS = {"start_seconds": "score from here (s, >= 0, inside the file; default 0)",
             "end_seconds": "score up to here (s, > start_seconds; past the end: the end; default the end)",
             "window_seconds": "scoring window (s, within GET /v1/model's request_window_bounds_seconds; "
                               "default the service's)"}
# the options in the OpenAPI schema (the route reads the request itself, so FastAPI cannot infer them)
OPENAPI_PARAMETERS = [{"name": name, "in": "query", "required": False, "description": _MEANINGS[name],
                       "schema": {"type": "number"}} for name in OPTION_NAMES]


def _invalid(detail: str) -> RequestError:
    return RequestError(422, "invalid_option", detail)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _invalid(f"{name} must be a number of seconds, got {text[:40]!r}") from None
    if not math.isfinite(value):
        raise _invalid(f"{name} must be a finite number of seconds, got {text[:40]!r}")
    return value


@dataclass(frozen=True)
class ScoreOptions:
    start_seconds: float | None = None
    end_seconds: float | None = None
    window_seconds: float | None = None

    @classmethod
    def parse(cls, *sources: Iterable[tuple[str, str]]) -> "ScoreOptions":
        """The options of ``(name, text)`` pairs (query parameters, form fields); checks what needs no audio."""
        values: dict[str, float] = {}
        for source in sources:
            for name, text in source:
                if name not in OPTION_NAMES:
                    continue
                if name in values:
                    raise _invalid(f"{name} is given twice (query and form fields together count); give it once")
                values[name] = _number(name, str(text))
        options = cls(**values)
        start = options.start_seconds
        if start is not None and start < 0:
            raise _invalid(f"start_seconds must be >= 0 and < the file's duration, got {start:g}")
        if options.end_seconds is not None and options.end_seconds <= (start or 0.0):
            raise _invalid(f"end_seconds must be > start_seconds ({start or 0.0:g}), got {options.end_seconds:g}")
        return options

    @property
    def given(self) -> bool:
        return any(value is not None for value in (self.start_seconds, self.end_seconds, self.window_seconds))

    def check_window(self, bounds: tuple[float, float]) -> None:
        low, high = bounds
        if self.window_seconds is not None and not low <= self.window_seconds <= high:
            raise _invalid(f"window_seconds must be within this service's bounds {low:g}..{high:g} s, "
                           f"got {self.window_seconds:g}")

    def region(self, num_samples: int) -> tuple[int, int]:
        """``[start, stop)`` in samples of decoded audio of ``num_samples`` (the whole of it by default)."""
        start = 0 if self.start_seconds is None else round(self.start_seconds * SAMPLE_RATE_HZ)
        if start >= num_samples:
            raise _invalid(f"start_seconds must be >= 0 and < the file's duration "
                           f"{num_samples / SAMPLE_RATE_HZ:.3f} s, got {self.start_seconds:g}")
        stop = num_samples if self.end_seconds is None else min(num_samples, round(self.end_seconds * SAMPLE_RATE_HZ))
        return start, max(stop, start + 1)

    def window(self, service: WindowConfig) -> WindowConfig:
        """The request's windows: the service's, or ``window_seconds`` at the service's overlap."""
        if self.window_seconds is None:
            return service
        hop = self.window_seconds * service.hop_seconds / service.window_seconds
        return WindowConfig(self.window_seconds, hop, service.min_tail_seconds)


def used(region: tuple[int, int], window: WindowConfig) -> dict[str, dict[str, float]]:
    """The answer's ``region`` and ``window``: what was scored, in seconds."""
    return {"region": {"start_seconds": region[0] / SAMPLE_RATE_HZ, "end_seconds": region[1] / SAMPLE_RATE_HZ},
            "window": {"window_seconds": window.window_seconds, "hop_seconds": window.hop_seconds}}
