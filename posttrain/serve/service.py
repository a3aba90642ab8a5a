"""What a running ``posttrain serve`` holds (model, limits, folder, admission, batcher, metrics) and how
it scores one received file.

A file's life: its header is probed and checked against its data (``posttrain.data.audio.probe``: a rate
out of range, an unreadable or truncated file is refused before any decoding); it is admitted for the
seconds its header claims (``engine.Admission``, 503 + Retry-After when the queue is full); it is decoded
by one of ``decode_workers`` threads, streaming and stopping one frame past ``max_upload_seconds`` (413),
whatever its header said, and the admission grows to what was really decoded; near-silent or too-short
audio is refused (422); it is windowed and scored by a batcher: clips of at most ``short_lane_seconds``
in the short lane, the rest in the long lane, each lane its own thread (on the CPU, one core each), so
a short clip never waits for a long file's pass. A header that disagrees with the data
is reported in ``warnings``. Every refusal is a ``RequestError`` (one-word kind, one-line detail).
With ``--drift-reference``, each scored file's embedding (from the same pass, aggregated over its
windows like its logits) goes to the drift monitor (``posttrain.serve.drift``); an ONNX export without an
``embedding`` output is served with drift monitoring off, said once at start and at ``/v1/drift``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import torch

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.eval.inference import SampleOutput, embedding_unavailable, min_input_samples
from posttrain.eval.scoring import NEAR_SILENT_DBFS, Decision, WindowConfig, aggregate, p_real
from posttrain.eval.timeline import timeline_of
from posttrain.select.drift import SlicedReference
from posttrain.serve.config import ServeConfig
from posttrain.serve.drift import DriftMonitor
from posttrain.serve.engine import Admission, Batcher, Busy
from posttrain.serve.metrics import Metrics
from posttrain.serve.options import ScoreOptions, used
from posttrain.serve.receive import RequestError
from posttrain.serve.tempspace import ServiceFolder

log = logging.getLogger("posttrain.serve")

# AudioError reasons that are about size, answered 413 like an upload over the byte limit
_TOO_LARGE_REASONS = ("too_long",)


def lanes_of(cfg: ServeConfig) -> tuple[str, ...]:
    """The batchers' lanes: a short one beside the long one unless ``short_lane_seconds`` is 0."""
    return ("short", "long") if cfg.short_lane_seconds > 0 else ("long",)


def lane_threads(cfg: ServeConfig) -> int:
    """CPU threads for one lane's passes: torch's threads shared out among the lanes, so a short clip's pass runs
    beside a long pass rather than after it (read before ``ServiceState`` sets torch's to it)."""
    return max(1, torch.get_num_threads() // len(lanes_of(cfg)))


class ServiceState:
    """Everything a running service holds."""

    def __init__(self, cfg: ServeConfig, model, identity: dict[str, Any], device,
                 drift_reference: SlicedReference | None = None):
        from posttrain.eval.scoring import resolve_calibration

        self.cfg, self.model, self.identity = cfg, model, identity
        # why a --drift-reference is not monitored: an ONNX export without an embedding output still serves
        self.drift_off_reason = None if drift_reference is None else embedding_unavailable(model)
        if self.drift_off_reason:
            log.warning("drift monitoring is off: %s", self.drift_off_reason)
        self.drift = None if drift_reference is None or self.drift_off_reason else DriftMonitor(
            drift_reference, window_files=cfg.drift_window_files, every_files=cfg.drift_every_files,
            every_seconds=cfg.drift_every_seconds)
        self.scoring = model.score_definition  # logit_diff, or the one-class head's cosine
        self.calibration, self.calibration_source = resolve_calibration(cfg.calibration, identity, self.scoring)
        self.decision = Decision.of(self.calibration, definition=self.scoring, operating_point=cfg.operating_point)
        self.window = WindowConfig(cfg.window_seconds, cfg.hop_seconds, cfg.min_tail_seconds)
        self.min_samples = min_input_samples(model)
        self.admission = Admission(cfg.max_inflight_seconds * SAMPLE_RATE_HZ, cfg.max_queue, cfg.queue_timeout_seconds)
        self.folder = ServiceFolder(cfg.temp_dir)
        # multipart spooling and the decoders' own temporary files land in the service's folder too, so
        # a killed service leaves them where the next one removes them
        tempfile.tempdir = str(self.folder.path)
        self.metrics = Metrics(self)
        self.decoders = anyio.CapacityLimiter(cfg.decode_workers)
        lanes = lanes_of(cfg)
        if len(lanes) > 1 and device.type == "cpu":
            torch.set_num_threads(lane_threads(cfg))
        # the short lane does not wait for windows to join: its clips are latency-bound, not throughput-bound
        self.lanes = {lane: Batcher(model, device, max_batch_seconds=cfg.max_batch_seconds,
                                    max_batch_size=cfg.max_batch_size,
                                    max_wait_ms=0.0 if lane == "short" else cfg.max_batch_wait_ms,
                                    precision=cfg.precision, on_pass=self.metrics.count_pass, name=lane)
                      for lane in lanes}
        self.closing = False

    @property
    def batchers(self) -> list[Batcher]:
        return list(self.lanes.values())

    def lane(self, samples: int) -> Batcher:
        """The short lane for audio of at most ``short_lane_seconds``, else the long one."""
        if "short" in self.lanes and samples <= self.cfg.short_lane_seconds * SAMPLE_RATE_HZ:
            return self.lanes["short"]
        return self.lanes["long"]

    @property
    def temp(self) -> Path:
        return self.folder.path

    def window_bounds(self) -> tuple[float, float]:
        """The ``window_seconds`` a request may ask (``ServeConfig.request_window_bounds``, and never shorter
        than the model's shortest input)."""
        low, high = self.cfg.request_window_bounds()
        return max(low, self.min_samples / SAMPLE_RATE_HZ), high

    def close(self) -> None:
        self.closing = True
        for batcher in self.batchers:
            batcher.close(self.cfg.shutdown_timeout_seconds)
        if self.drift is not None:
            self.drift.close()
        self.folder.close()

    async def score_file(self, path: Path, name: str, options: ScoreOptions | None = None) -> dict[str, Any]:
        """The result of one received file (removed by the caller), of the region and window ``options``
        ask (``posttrain.serve.options``); ``RequestError`` when refused."""
        options = options or ScoreOptions()
        options.check_window(self.window_bounds())
        info = await anyio.to_thread.run_sync(_probe, path, name, limiter=self.decoders)
        limit = self.cfg.max_upload_seconds
        if info.exact and info.duration_s is not None and info.duration_s > limit:  # checked against the data
            raise RequestError(413, "too_long", f"{name}: {info.duration_s:.1f} s of audio; this service scores at "
                                                f"most {limit:g} s per file (cut it, or raise --max-upload-seconds)")
        claimed = limit if info.duration_s is None else min(info.duration_s, limit)
        admitted = max(1, math.ceil(claimed * SAMPLE_RATE_HZ))
        try:
            await self.admission.acquire(admitted)
        except Busy as error:
            raise RequestError(503, "busy", f"service busy: {error}") from None
        try:
            wave = await anyio.to_thread.run_sync(_decode, path, name, info, limit, self.cfg.decode_timeout_seconds,
                                                  limiter=self.decoders)
            if len(wave.samples) > admitted:  # more than the header said: hold what is really there
                self.admission.overdraw(len(wave.samples) - admitted)
                admitted = len(wave.samples)
            return await self._score_wave(wave, name, options)
        finally:
            self.admission.release(admitted)

    async def _score_wave(self, wave: audio.Waveform, name: str, options: ScoreOptions | None = None
                          ) -> dict[str, Any]:
        options = options or ScoreOptions()
        region, window = options.region(len(wave.samples)), options.window(self.window)
        samples = wave.samples[region[0]:region[1]]  # the region is cut from the bounded decode
        level = audio.level_dbfs(samples)
        if level < NEAR_SILENT_DBFS:
            raise RequestError(422, "near_silent", f"{name}: near-silent input ({level:.0f} dBFS RMS, below "
                                                   f"{NEAR_SILENT_DBFS:g}): its score would say nothing")
        if len(samples) < self.min_samples:
            raise RequestError(422, "too_short", f"{name}: {len(samples) / SAMPLE_RATE_HZ:.3f} s; the model needs "
                                                 f"at least {self.min_samples / SAMPLE_RATE_HZ:.3f} s")
        spans = window.spans(len(samples))
        futures = self.lane(len(samples)).submit([samples[start:stop] for start, stop in spans])
        windows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        window_logits = np.stack([logits for logits, _ in windows])
        pooled = None if self.drift is None else np.stack([embedding for _, embedding in windows])
        lengths = np.array([stop - start for start, stop in spans])
        logits, embedding = aggregate(lengths, window_logits, pooled, self.cfg.aggregation)
        in_file = tuple((start + region[0], stop + region[0]) for start, stop in spans)  # the timeline's times
        output = SampleOutput(0, name, {}, logits, embedding, len(spans), len(samples), in_file, window_logits)
        self.metrics.audio.inc(output.seconds)
        if self.drift is not None and window == self.window:  # the reference was made with the service's windows
            self.drift.add(embedding)
        result = self._result(output, level)
        # its windows are in the file's time (above), so its axis runs to the region's end, not its length
        result["timeline"]["seconds"] = region[1] / SAMPLE_RATE_HZ
        return {**result, "warnings": list(wave.warnings), **(used(region, window) if options.given else {})}

    def _result(self, output: SampleOutput, level: float) -> dict[str, Any]:
        """The score under its name (``logit_diff`` / ``cosine``); ``p_real``: the softmax P(real) of logits,
        or for a cosine the calibrated one (else null); ``probability_real_calibrated``: the calibration's."""
        scoring, calibration = self.scoring, self.calibration
        score = float(scoring.scores(output.logits))
        llr = probability = None
        if calibration is not None:
            llr = float(calibration.llr([score])[0])
            probability = float(calibration.probability([score])[0])
        p_real_of = p_real(output.logits, scoring, calibration)
        return {"file": output.id, "seconds": output.seconds, "windows": output.num_windows,
                "score_definition": scoring.name, scoring.name: score,
                "p_real": None if p_real_of is None else float(p_real_of), "llr": llr,
                "probability_real_calibrated": probability, "decision": self.decision.label(score),
                "level_dbfs": level, "timeline": timeline_of(output, self.decision, calibration, scoring).to_dict()}


def _refusal(error: audio.AudioError, path: Path, name: str) -> RequestError:
    status = 413 if error.reason in _TOO_LARGE_REASONS else 422
    return RequestError(status, error.reason, error.detail.replace(str(path), name).replace(path.name, name))


def _probe(path: Path, name: str) -> audio.AudioInfo:
    try:
        return audio.probe(path)
    except audio.AudioError as error:
        raise _refusal(error, path, name) from None


def _decode(path: Path, name: str, info: audio.AudioInfo, max_seconds: float, timeout_s: float) -> audio.Waveform:
    """16 kHz mono samples of at most ``max_seconds``, decoded by what the data holds."""
    try:
        return audio.load(path, sample_rate_hz=SAMPLE_RATE_HZ, max_seconds=max_seconds, timeout_s=timeout_s, info=info)
    except audio.AudioError as error:
        raise _refusal(error, path, name) from None
    except Exception as error:  # noqa: BLE001 - a decoder crash on a hostile file is that file's problem
        raise RequestError(422, "unreadable", f"{name}: cannot be decoded ({type(error).__name__})") from None
