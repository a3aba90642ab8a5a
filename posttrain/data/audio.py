"""Audio in: decode any format a corpus ships or a user uploads, mono, 16 kHz, within a budget; audio out:
FLAC bytes for the shards.

``probe`` reads a file's header (libsndfile; ffprobe for what libsndfile refuses: m4a, mp4, aac, webm,
opus-in-matroska, ...), refuses a sample rate outside the resampler's range before any work, and checks
the header's length against what the data holds (``posttrain.data.audio_extent``): a header that
understates its file is decoded by ffmpeg, which follows the data, and says so in a warning; one that
overstates it is ``truncated``. ``load`` then streams the decode (``posttrain.data.decoders``) into the
one resampler (``posttrain.data.resample``) and stops one frame past ``max_seconds``: memory is bounded
by the limit, never by the file, and the duration used is what was decoded.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.audio_extent import extent
from posttrain.data.decoders import (DecodeError, ffmpeg_blocks, ffprobe, native_stderr_captured,
                                     soundfile_blocks)
from posttrain.data.resample import RateError, StreamResampler, check_rate

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".mp4", ".aac", ".opus", ".webm")  # what folders give
# the most audio decoded from one outside file unless the caller says otherwise: it bounds a decode's
# memory (about 4 bytes a sample at the file's own rate); a longer file is refused as too_long
DEFAULT_MAX_FILE_SECONDS = 3 * 3600.0
DECODE_TIMEOUT_S = 300.0  # ffmpeg's wall-clock deadline per file (a hostile file cannot spin for ever)
# containers whose length field is meant to be exact, and how far (frames) libsndfile's count may sit
# from the data's (an MP3 decoder trims the encoder delay and padding: up to about two frames)
_EXACT_CONTAINERS = {"WAV": 0, "WAVEX": 0, "FLAC": 0, "MP3": 3 * 1152}


class AudioError(ValueError):
    """Audio that cannot be used; ``reason`` says what happened, counted in ``rejects.jsonl``:
    ``missing`` (no such file), ``unreadable`` (no decoder could read it: the decoder's own message),
    ``empty`` (no samples), ``nan`` (NaN/inf samples), ``too_short``, ``too_long`` (more than the
    caller's ``max_seconds`` decoded), ``duration_mismatch`` (the decoded audio disagrees with the
    protocol's ``Duration``), ``truncated`` (less data than the header declares), ``length_mismatch``
    (more data than the header declares, where the caller refuses that), ``rate_out_of_range``
    (outside ``posttrain.data.resample``'s range) and ``decode_timeout`` (the decoder's deadline)."""

    REASONS = ("missing", "unreadable", "empty", "nan", "too_short", "too_long", "duration_mismatch", "truncated",
               "length_mismatch", "rate_out_of_range", "decode_timeout")

    def __init__(self, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown audio reject reason {reason!r}")
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass
class Waveform:
    """Mono float32 samples at ``sample_rate_hz``; ``orig_sample_rate_hz`` is the file's own rate,
    ``declared_seconds`` what its header claims (``None``: no claim) and ``warnings`` each disagreement
    between the header and the data (``"length_mismatch: ..."``)."""

    samples: np.ndarray
    sample_rate_hz: int
    orig_sample_rate_hz: int
    declared_seconds: float | None = None
    warnings: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate_hz


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, checked: ``decoder`` is ``"soundfile"`` or ``"ffmpeg"`` (the latter
    also for a file whose header understates its data, ``understated`` then True)."""

    duration_s: float | None  # the header's claim (None: no claim)
    sample_rate_hz: int
    channels: int
    encoding: str
    bits_per_sample: str
    container: str  # libsndfile's format name, or ffmpeg's codec name
    decoder: str
    exact: bool  # the claim is meant to be exact (and was checked against the data)
    declared_frames: int | None = None
    understated: bool = False
    warnings: tuple[str, ...] = field(default=())


def audio_inputs(paths) -> list[Path]:
    """Files and folders named by a user -> audio files: a folder gives its ``AUDIO_EXTENSIONS`` files,
    recursively, sorted by path; a file is kept as named (existing or not). ``UserError`` for a folder
    without audio."""
    from posttrain.errors import UserError

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
            if not inside:
                raise UserError(f"{path}: no audio found (searched recursively for {', '.join(AUDIO_EXTENSIONS)})")
            found += inside
        else:
            found.append(path)
    return found


def _describe(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


# libsndfile's answers when it simply does not know a format; for a file that exists they say nothing
# about it (its "possibly a pipe?" even misleads), so the message is then ffmpeg's own.
_SOUNDFILE_GENERIC = ("Format not recognised", "possibly a pipe")


def _soundfile_message(error: Exception, notes: list[str]) -> str:
    """libsndfile's own words, without soundfile's "Error opening <path>: " prefix (plus libmpg123's notes,
    which say more than libsndfile's summary)."""
    message = str(error).split("': ", 1)[-1].split(">: ", 1)[-1].strip()
    return f"{message}: {'; '.join(notes[:3])}" if notes else message


def probe(path: str | Path) -> AudioInfo:
    """The checked header of ``path`` (nothing is decoded); ``AudioError`` for a missing, empty or
    unreadable file, a rate out of range, or a file holding less data than its header declares."""
    path = Path(path)
    if not path.is_file():
        raise AudioError("missing", f"{path}: no such file")
    if path.stat().st_size == 0:
        raise AudioError("empty", f"{path}: a 0-byte file")
    soundfile_message = ""
    with native_stderr_captured() as notes:
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError, TypeError) as error:
            info, failure = None, error
    if info is None or info.samplerate <= 0:
        if info is None:
            soundfile_message = _soundfile_message(failure, notes)
        return _ffprobe_info(path, soundfile_message)
    rate = _checked_rate(info.samplerate, path)
    bits = re.search(r"(\d+)", info.subtype or "")
    return _checked_extent(path, AudioInfo(
        info.frames / rate, rate, int(info.channels), info.subtype or info.format,
        bits.group(1) if bits and "PCM" in (info.subtype or "") else "-", info.format, "soundfile",
        info.format in _EXACT_CONTAINERS, int(info.frames)))


def _checked_rate(rate_hz: float, path: Path) -> int:
    try:
        return check_rate(rate_hz, str(path))
    except RateError as error:
        raise AudioError("rate_out_of_range", str(error)) from None


def _ffprobe_info(path: Path, soundfile_message: str) -> AudioInfo:
    try:
        found = ffprobe(path)
    except DecodeError as error:
        generic = not soundfile_message or any(words in soundfile_message for words in _SOUNDFILE_GENERIC)
        detail = error.detail if generic else f"{soundfile_message} (libsndfile); {error.detail}"
        raise AudioError(error.reason, f"{path}: {detail}") from None
    rate = _checked_rate(found["sample_rate"], path)
    if not 1 <= found["channels"] <= 255:
        raise AudioError("unreadable", f"{path}: {found['channels']} channels")
    return AudioInfo(found["duration"], rate, found["channels"], found["codec_name"].upper(), "-",
                     found["codec_name"], "ffmpeg", False)


def _checked_extent(path: Path, info: AudioInfo) -> AudioInfo:
    """``info`` after comparing its length with the data's (module docstring)."""
    tolerance = _EXACT_CONTAINERS.get(info.container)
    found = None if tolerance is None else extent(path, info.container)
    if found is None:
        return info
    counted = found.counted
    declared = info.declared_frames if found.declared is None else found.declared
    slack = tolerance + 0.01 * declared
    if counted is not None and counted < declared - slack:
        raise AudioError("truncated", f"{path}: truncated (its data holds {counted / info.sample_rate_hz:.2f} s of "
                                      f"the {declared / info.sample_rate_hz:.2f} s its header declares)")
    if counted is not None and counted <= declared + slack:
        return info
    if counted is None and info.container in ("WAV", "WAVEX"):
        return info  # a RIFF layout not parsed here (libsndfile knows more variants): its count stands
    # more data than the header admits (or data that cannot be counted): decode by the data
    return replace(info, decoder="ffmpeg", understated=counted is not None, exact=False,
                   duration_s=declared / info.sample_rate_hz)


def _read(path: Path, info: AudioInfo, max_frames: int | None, timeout_s: float,
          consume: Callable[[np.ndarray], None]) -> None:
    """Decode ``path`` in ``[frames, channels]`` blocks into ``consume``, at most ``max_frames`` frames.
    A file libsndfile opens but cannot decode from its start goes to ffmpeg (the message then has both)."""
    soundfile_message = ""
    if info.decoder == "soundfile":
        consumed = 0
        with native_stderr_captured() as notes:
            try:
                with sf.SoundFile(str(path)) as handle:
                    for block in soundfile_blocks(handle, max_frames):
                        consumed += 1
                        consume(block)
            except (sf.LibsndfileError, RuntimeError, TypeError) as error:
                failure = error
            else:
                return
        soundfile_message = _soundfile_message(failure, notes)
        if consumed:
            raise AudioError("unreadable", f"{path}: {soundfile_message}")
    try:
        for block in ffmpeg_blocks(path, info.sample_rate_hz, info.channels, max_frames, timeout_s=timeout_s,
                                   ignore_length=info.container in ("WAV", "WAVEX")):
            consume(block)
    except DecodeError as error:
        detail = f"{soundfile_message} (libsndfile); {error.detail}" if soundfile_message else error.detail
        raise AudioError(error.reason, f"{path}: {detail}") from None


def decode(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode a whole file path or encoded bytes (audio this package made or trusts: no budget) to
    ``([frames, channels] float32, sample_rate_hz)``."""
    if isinstance(source, (bytes, bytearray)):
        with tempfile.NamedTemporaryFile(suffix=".audio") as handle:
            handle.write(source)
            handle.flush()
            try:
                return decode(handle.name)
            except AudioError as error:
                raise AudioError(error.reason, error.detail.replace(handle.name, _describe(source))) from None
    path = Path(source)
    info = probe(path)
    blocks: list[np.ndarray] = []
    _read(path, info, None, DECODE_TIMEOUT_S, blocks.append)
    if not blocks:
        return np.zeros((0, info.channels), np.float32), info.sample_rate_hz
    return np.concatenate(blocks), info.sample_rate_hz


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[frames, channels]`` (or 1-D) -> 1-D float32, the mean of the channels."""
    return samples.astype(np.float32, copy=False) if samples.ndim == 1 else samples.mean(axis=1, dtype=np.float32)


def check(samples: np.ndarray, sample_rate_hz: int, min_seconds: float, source: str) -> None:
    """Raise ``AudioError`` for audio no detector should train on."""
    if samples.size == 0:
        raise AudioError("empty", f"{source}: no samples")
    if not np.isfinite(samples).all():
        raise AudioError("nan", f"{source}: {int((~np.isfinite(samples)).sum())} NaN/inf samples")
    seconds = samples.shape[0] / sample_rate_hz
    if seconds < min_seconds:
        raise AudioError("too_short", f"{source}: {seconds:.3f} s < min {min_seconds:g} s")


class _Budgeted:
    """Downmixes blocks into the resampler, counting frames and non-finite samples as they pass."""

    def __init__(self, resampler: StreamResampler):
        self.resampler, self.frames, self.nonfinite = resampler, 0, 0

    def __call__(self, block: np.ndarray) -> None:
        mono = to_mono(block)
        self.frames += len(mono)
        finite = np.isfinite(mono)
        if not finite.all():
            self.nonfinite += int((~finite).sum())
            mono = np.where(finite, mono, 0.0).astype(np.float32)  # NaN stops here; the file is refused below
        self.resampler.feed(mono)


def load(path: str | Path, *, sample_rate_hz: int = SAMPLE_RATE_HZ, min_seconds: float = 0.0,
         max_seconds: float | None = None, timeout_s: float = DECODE_TIMEOUT_S, info: AudioInfo | None = None) -> Waveform:
    """Probe (unless ``info`` is this file's probe already), decode (at most ``max_seconds``: more is
    ``too_long``), check, downmix and resample."""
    path = Path(path)
    info = info or probe(path)
    rate = info.sample_rate_hz
    max_frames = None if max_seconds is None else math.floor(max_seconds * rate) + 1
    sink = _Budgeted(StreamResampler(rate, sample_rate_hz))
    _read(path, info, max_frames, timeout_s, sink)
    declared = f"its header says {info.duration_s:.1f} s" if info.duration_s is not None else "no length in its header"
    if max_frames is not None and sink.frames >= max_frames:
        raise AudioError("too_long", f"{path}: more than {max_seconds:g} s of audio decoded ({declared}); "
                                     f"the limit is {max_seconds:g} s")
    if sink.frames == 0:
        raise AudioError("empty", f"{path}: no samples")
    if sink.nonfinite:
        raise AudioError("nan", f"{path}: {sink.nonfinite} NaN/inf samples")
    if sink.frames / rate < min_seconds:
        raise AudioError("too_short", f"{path}: {sink.frames / rate:.3f} s < min {min_seconds:g} s")
    return Waveform(sink.resampler.finish(), sample_rate_hz, rate, info.duration_s,
                    _length_warnings(info, sink.frames))


def _length_warnings(info: AudioInfo, frames: int) -> tuple[str, ...]:
    """The header's claim against what was decoded: ``length_mismatch`` when they disagree by more than
    a codec's framing (exact headers that overstate were refused as ``truncated`` by ``probe``)."""
    if info.duration_s is None:
        return ()
    decoded_s = frames / info.sample_rate_hz
    if abs(decoded_s - info.duration_s) <= 0.1 + 0.02 * max(decoded_s, info.duration_s):
        return ()
    return (f"length_mismatch: the header says {info.duration_s:.2f} s, the data holds {decoded_s:.2f} s "
            f"(what was decoded is used)",)


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
