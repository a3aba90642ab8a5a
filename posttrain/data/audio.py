"""Audio in: decode any format a corpus ships, mono, 16 kHz; audio out: FLAC bytes for the shards.

soundfile (libsndfile) reads wav/flac/ogg/mp3 and more; everything it refuses (m4a, mp4, aac, webm,
opus-in-mp4, ...) goes through the ffmpeg command line, decoded to float32 PCM on a pipe.
Resampling is torchaudio's windowed-sinc resampler.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from posttrain.config import SAMPLE_RATE_HZ


class AudioError(ValueError):
    """Audio that cannot enter a shard; ``reason`` is one short word used to count rejects."""

    REASONS = ("unreadable", "empty", "non-finite", "too-short", "duration-mismatch")

    def __init__(self, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown audio reject reason {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class Waveform:
    """Mono float32 samples at ``sample_rate_hz``; ``orig_sample_rate_hz`` is the file's own rate."""

    samples: np.ndarray
    sample_rate_hz: int
    orig_sample_rate_hz: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate_hz


def _describe(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def decode(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes to ``([frames, channels] float32, sample_rate_hz)``."""
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise AudioError("unreadable", f"{source}: no such file")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        samples, rate = sf.read(handle, dtype="float32", always_2d=True)
        return samples, int(rate)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        soundfile_error = error
    try:
        return decode_with_ffmpeg(source)
    except AudioError as error:
        raise AudioError("unreadable", f"{_describe(source)}: soundfile: {soundfile_error}; "
                                       f"ffmpeg: {error.detail}") from None


def _ffmpeg_binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise AudioError("unreadable", f"{name} not found on PATH: install ffmpeg to read m4a/mp4/aac/webm audio")
    return binary


def _probe_stream(path: Path) -> tuple[int, int]:
    """Sample rate and channel count of the first audio stream (ffprobe)."""
    result = subprocess.run(
        [_ffmpeg_binary("ffprobe"), "-v", "error", "-select_streams", "a:0", "-show_entries",
         "stream=sample_rate,channels", "-of", "json", str(path)],
        capture_output=True, text=True, check=False)
    streams = json.loads(result.stdout or "{}").get("streams", []) if result.returncode == 0 else []
    if not streams:
        raise AudioError("unreadable", f"{path}: ffprobe found no audio stream {result.stderr.strip()[-300:]}")
    return int(streams[0]["sample_rate"]), int(streams[0]["channels"])


def decode_with_ffmpeg(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode with the ffmpeg CLI, keeping the native rate and channels (downmixing is ours: a plain mean)."""
    if isinstance(source, (bytes, bytearray)):
        # mp4/m4a keep their index (moov) wherever the muxer put it, often at the end, so ffmpeg
        # needs a seekable file rather than a pipe.
        with tempfile.NamedTemporaryFile(suffix=".audio") as handle:
            handle.write(source)
            handle.flush()
            return decode_with_ffmpeg(handle.name)
    path = Path(source)
    rate, channels = _probe_stream(path)
    result = subprocess.run(
        [_ffmpeg_binary("ffmpeg"), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0",
         "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(rate), "pipe:1"],
        capture_output=True, check=False)
    if result.returncode != 0:
        raise AudioError("unreadable", f"{path}: ffmpeg failed: {result.stderr.decode(errors='replace')[-300:]}")
    samples = np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)
    return samples[: len(samples) // channels * channels].reshape(-1, channels), rate


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[frames, channels]`` (or 1-D) -> 1-D float32, the mean of the channels."""
    return samples.astype(np.float32, copy=False) if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)


@functools.lru_cache(maxsize=32)
def _resampler(orig_hz: int, new_hz: int):
    # Imported here so decoding/verifying shards does not pay for loading torch.
    # The transform precomputes its sinc kernel; corpora use few distinct rates, so reuse it.
    import torchaudio

    return torchaudio.transforms.Resample(orig_hz, new_hz)


def resample(samples: np.ndarray, orig_hz: int, new_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Resample a 1-D float32 signal with torchaudio (windowed sinc)."""
    if orig_hz == new_hz:
        return samples
    import torch

    with torch.inference_mode():
        out = _resampler(int(orig_hz), int(new_hz))(torch.from_numpy(np.ascontiguousarray(samples)))
    return out.numpy()


def check(samples: np.ndarray, sample_rate_hz: int, min_seconds: float, source: str) -> None:
    """Raise ``AudioError`` for audio no detector should train on."""
    if samples.size == 0:
        raise AudioError("empty", f"{source}: no samples")
    if not np.isfinite(samples).all():
        raise AudioError("non-finite", f"{source}: {int((~np.isfinite(samples)).sum())} NaN/inf samples")
    seconds = samples.shape[0] / sample_rate_hz
    if seconds < min_seconds:
        raise AudioError("too-short", f"{source}: {seconds:.3f} s < min {min_seconds:g} s")


def load(source: str | Path | bytes, *, sample_rate_hz: int = SAMPLE_RATE_HZ,
         min_seconds: float = 0.0) -> Waveform:
    """Decode, check, downmix and resample: the audio a shard stores."""
    samples, orig_rate = decode(source)
    check(samples, orig_rate, min_seconds, _describe(source))
    mono = resample(to_mono(samples), orig_rate, sample_rate_hz)
    return Waveform(mono, sample_rate_hz, orig_rate)


def encode_flac(samples: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """1-D float32 in [-1, 1] -> FLAC bytes, 16-bit PCM (libsndfile clips values outside the range)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate_hz, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes -> (1-D float32, sample_rate_hz); the reverse of ``encode_flac`` for mono audio."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return to_mono(samples), int(rate)
