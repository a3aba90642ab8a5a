"""Audio in: decode any format a corpus ships, mono, 16 kHz; audio out: FLAC bytes for the shards.

soundfile (libsndfile) reads wav/flac/ogg/mp3 and more; everything it refuses (m4a, mp4, aac, webm,
opus-in-mp4, ...) goes through the ffmpeg command line, decoded to float32 PCM on a pipe.
Resampling is torchaudio's windowed-sinc resampler.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from posttrain.config import SAMPLE_RATE_HZ

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """Audio that cannot enter a shard; ``reason`` says what happened, counted in ``rejects.jsonl``:
    ``missing`` (no such file), ``unreadable`` (no decoder could read it: the decoder's own message),
    ``empty`` (no samples), ``nan`` (NaN/inf samples), ``too_short``, ``duration_mismatch`` (the decoded
    audio disagrees with the protocol's ``Duration``)."""

    REASONS = ("missing", "unreadable", "empty", "nan", "too_short", "duration_mismatch", "truncated")

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


# libsndfile's answers when it simply does not know a format; for a file that exists they say nothing
# about it (its "possibly a pipe?" even misleads), so the message is then ffmpeg's own.
_SOUNDFILE_GENERIC = ("Format not recognised", "possibly a pipe")
# What libmpg123 (inside libsndfile) prints straight to the process's stderr on slightly odd mp3s.
_DECODER_CHATTER = re.compile(r"^(Note:|Warning:|\[src/libmpg123/)")


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[list[str]]:
    """Capture what C libraries write to file descriptor 2 meanwhile (the yielded list gets its lines).

    Lines that are not decoder chatter go back to stderr afterwards (another thread's message is
    delayed, not lost); the chatter is the caller's to use (a reject's detail) or drop.
    """
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all (a daemon): nothing to keep clean
            yield lines
            return
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            lines += [line for line in text.splitlines() if _DECODER_CHATTER.match(line)]
            other = "".join(line + "\n" for line in text.splitlines() if line and not _DECODER_CHATTER.match(line))
            if other:
                sys.stderr.write(other)
    if lines:
        log.debug("decoder notes: %s", "; ".join(lines))


_STDERR_LOCK = threading.Lock()


def _soundfile_read(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with _native_stderr_captured() as notes:
        try:
            samples, rate = sf.read(handle, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            error.decoder_notes = notes  # filled as the capture ends: the decoder's own account
            raise
    return samples, int(rate)


def _soundfile_message(error: Exception) -> str:
    """libsndfile's own words, without soundfile's "Error opening <path>: " prefix."""
    return str(error).split("': ", 1)[-1].split(">: ", 1)[-1].strip()


def decode(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes to ``([frames, channels] float32, sample_rate_hz)``."""
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise AudioError("missing", f"{source}: no such file")
    if not isinstance(source, (bytes, bytearray)) and Path(source).stat().st_size == 0:
        raise AudioError("empty", f"{source}: a 0-byte file")
    try:
        return _soundfile_read(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        soundfile_message = _soundfile_message(error)
        notes = getattr(error, "decoder_notes", [])
        if notes:  # libmpg123's notes say more than libsndfile's summary
            soundfile_message = f"{soundfile_message}: {'; '.join(notes[:3])}"
    try:
        return decode_with_ffmpeg(source)
    except AudioError as error:
        ffmpeg_message = error.detail
    generic = any(words in soundfile_message for words in _SOUNDFILE_GENERIC)
    detail = ffmpeg_message if generic else f"{soundfile_message} (libsndfile); {ffmpeg_message}"
    raise AudioError("unreadable", f"{_describe(source)}: {detail}")


def _ffmpeg_words(stderr: str, path: Path) -> str:
    """ffmpeg's own message: its last lines, without the path and ``[demuxer @ 0x...]`` prefixes."""
    lines = []
    for line in stderr.strip().splitlines()[-3:]:
        line = re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\] ", "", line.strip())
        line = line[len(str(path)) + 2:] if line.startswith(f"{path}: ") else line
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines)[-300:] or "no message"


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
        raise AudioError("unreadable", f"ffmpeg: {_ffmpeg_words(result.stderr, path) if result.stderr.strip() else 'no audio stream'}")
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
        raise AudioError("unreadable", f"ffmpeg: {_ffmpeg_words(result.stderr.decode(errors='replace'), path)}")
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
        raise AudioError("nan", f"{source}: {int((~np.isfinite(samples)).sum())} NaN/inf samples")
    seconds = samples.shape[0] / sample_rate_hz
    if seconds < min_seconds:
        raise AudioError("too_short", f"{source}: {seconds:.3f} s < min {min_seconds:g} s")


def load(source: str | Path | bytes, *, sample_rate_hz: int = SAMPLE_RATE_HZ,
         min_seconds: float = 0.0) -> Waveform:
    """Decode, check, downmix and resample: the audio a shard stores."""
    samples, orig_rate = decode(source)
    check(samples, orig_rate, min_seconds, _describe(source))
    mono = resample(to_mono(samples), orig_rate, sample_rate_hz)
    return Waveform(mono, sample_rate_hz, orig_rate)


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (floored at -200 dBFS for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    return 20.0 * math.log10(max(rms, 1e-10))


def encode_flac(samples: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> bytes:
    """1-D float32 in [-1, 1] -> FLAC bytes, 16-bit PCM (libsndfile clips values outside the range)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate_hz, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC bytes -> (1-D float32, sample_rate_hz); the reverse of ``encode_flac`` for mono audio."""
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return to_mono(samples), int(rate)


def flac_frames(data: bytes) -> int:
    """Frames in FLAC bytes, from the header (nothing is decoded)."""
    with sf.SoundFile(io.BytesIO(data)) as audio:
        return audio.frames


def decode_flac_into(data: bytes, out: np.ndarray, start: int = 0) -> tuple[int, int]:
    """Decode frames ``[start, start + len(out))`` of FLAC bytes straight into the 1-D float32 ``out``
    (the mean of the channels when not mono): no buffer of its own, no copy, and for a window only the
    FLAC frames around it are decoded. Returns ``(sample_rate_hz, frames in the file)``; a file that
    ends before the window does raises ``ValueError``."""
    with sf.SoundFile(io.BytesIO(data)) as audio:
        if audio.channels == 1:
            if start:
                audio.seek(start)
            got = len(audio.read(len(out), dtype="float32", out=out))
        else:
            window = to_mono(audio.read(dtype="float32"))[start:start + len(out)]
            got = len(window)
            out[:got] = window
        if got != len(out):
            raise ValueError(f"the file ends {len(out) - got} frames before the window [{start}, {start + len(out)})")
        return audio.samplerate, audio.frames


def probe_seconds(path: str | Path) -> tuple[float, bool]:
    """``(duration in seconds from the container header, exact)`` without decoding the audio: exact
    for what libsndfile reads (wav/flac/ogg), ffprobe's estimate otherwise. Raises ``AudioError``
    ("unreadable") for a file neither recognises, ("truncated") for a WAV shorter than its RIFF header says."""
    path = Path(path)
    try:
        with _native_stderr_captured():
            info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        info = None
    if info is not None and info.samplerate > 0:
        _check_riff_size(path)
        return info.frames / info.samplerate, True
    result = subprocess.run(
        [_ffmpeg_binary("ffprobe"), "-v", "error", "-select_streams", "a:0", "-show_entries",
         "format=duration:stream=codec_type", "-of", "json", str(path)], capture_output=True, text=True, check=False)
    found = json.loads(result.stdout or "{}") if result.returncode == 0 else {}
    duration = (found.get("format") or {}).get("duration")
    if not found.get("streams") or duration in (None, "N/A"):
        why = _ffmpeg_words(result.stderr, path) if result.stderr.strip() else "no audio stream with a duration"
        raise AudioError("unreadable", f"{path.name}: not audio that libsndfile or ffmpeg can read ({why})")
    return float(duration), False


def _check_riff_size(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] == b"RIFF":
        declared, actual = int.from_bytes(head[4:8], "little") + 8, path.stat().st_size
        if declared > actual and declared != 0xFFFFFFFF + 8:  # 0xFFFFFFFF: a streamed WAV of unknown size
            raise AudioError("truncated", f"{path.name}: truncated WAV ({actual} of the {declared} bytes its "
                                          f"header declares)")
