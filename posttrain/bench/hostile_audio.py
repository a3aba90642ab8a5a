"""Audio files that lie: headers claiming rates, lengths or sizes their data does not have. Written by
hand (struct) or by ffmpeg and patched, so each lie is exactly the one named. Used by the attack
benchmark (``python -m posttrain.bench attacks``) and the tests of the audio boundary."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf


def wav_header(rate_hz: int, data_bytes: int, *, channels: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate_hz, rate_hz * block, block, bits) +
            b"data" + struct.pack("<I", data_bytes))


def wav_with_rate(rate_hz: int, num_samples: int, seed: int = 0) -> bytes:
    """A 16-bit mono WAV whose header says ``rate_hz`` (``rate_hz`` may be absurd: 2,147,483,647)."""
    data = (np.random.default_rng(seed).standard_normal(num_samples) * 3000).astype("<i2").tobytes()
    return wav_header(rate_hz, len(data)) + data


def tone(seconds: float, rate_hz: int = 8000, hz: float = 330.0, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate_hz)) / rate_hz
    return (level * np.sin(2 * np.pi * hz * t) * (1 + 0.3 * np.sin(0.5 * t))).astype(np.float32)


def flac_declaring(seconds: float, declared_frames: int, rate_hz: int = 8000) -> bytes:
    """A FLAC of ``seconds`` of tone whose STREAMINFO says it holds ``declared_frames``."""
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, rate_hz), rate_hz, format="FLAC", subtype="PCM_16")
    data = bytearray(buffer.getvalue())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | declared_frames
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def mp3_behind_short_xing(work: Path, seconds: float) -> bytes:
    """A 1 s MP3 with its Xing header (frame count: 1 s), followed by ``seconds`` more of MPEG frames."""
    head, rest = work / "head.mp3", work / "rest.mp3"
    _ffmpeg("sine=f=440:r=16000:d=1", head, "-c:a", "libmp3lame", "-b:a", "32k")
    _ffmpeg(f"sine=f=300:r=16000:d={seconds}", rest, "-c:a", "libmp3lame", "-b:a", "32k", "-write_xing", "0",
            "-id3v2_version", "0")
    return head.read_bytes() + rest.read_bytes()


def mka_declaring_one_second(work: Path, seconds: float) -> bytes:
    """Opus in Matroska, ``seconds`` long, whose segment Duration says 1 s."""
    path = work / "long.mka"
    _ffmpeg(f"sine=f=300:r=8000:d={seconds}", path, "-c:a", "libopus", "-b:a", "6k")
    data = bytearray(path.read_bytes())
    at = data.find(bytes([0x44, 0x89, 0x88]))  # Info/Duration, an 8-byte float of milliseconds
    assert at > 0
    data[at + 3:at + 11] = struct.pack(">d", 1000.0)
    return bytes(data)


def _ffmpeg(source: str, out: Path, *options: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", source, *options, str(out)],
                   check=True)
