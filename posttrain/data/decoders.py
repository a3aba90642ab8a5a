"""The two decoders under ``posttrain.data.audio``, each streaming float32 blocks and stopping at a
frame budget: libsndfile (wav/flac/ogg/mp3 and more, in process) and the ffmpeg command line
(everything else: m4a, mp4, aac, webm, opus-in-matroska; and files whose header lies, since ffmpeg
decodes what the data holds). Memory is one block plus what the caller keeps, never what a header
claims; ffmpeg runs under a wall-clock deadline and is killed at the budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

log = logging.getLogger(__name__)

BLOCK_SAMPLES = 1 << 18  # samples (all channels) per block read
PROBE_TIMEOUT_S = 30.0
# libmpg123 (inside libsndfile) prints notes straight to the process's stderr on slightly odd mp3s
_DECODER_CHATTER = re.compile(r"^(Note:|Warning:|\[src/libmpg123/)")
_STDERR_LOCK = threading.Lock()


class DecodeError(Exception):
    """A decoder's own account of why it failed (``reason``: ``unreadable`` or ``decode_timeout``)."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(detail)


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
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
            text = capture.read(1 << 16).decode(errors="replace")
            lines += [line for line in text.splitlines() if _DECODER_CHATTER.match(line)]
            other = "".join(line + "\n" for line in text.splitlines() if line and not _DECODER_CHATTER.match(line))
            if other:
                sys.stderr.write(other)
    if lines:
        log.debug("decoder notes: %s", "; ".join(lines))


def soundfile_blocks(handle: sf.SoundFile, max_frames: int | None) -> Iterator[np.ndarray]:
    """``[frames, channels]`` float32 blocks of an open libsndfile file, at most ``max_frames`` frames in all."""
    block_frames = max(1, BLOCK_SAMPLES // max(1, handle.channels))
    remaining = max_frames
    while remaining is None or remaining > 0:
        want = block_frames if remaining is None else min(block_frames, remaining)
        block = handle.read(want, dtype="float32", always_2d=True)
        if len(block) == 0:
            return
        if remaining is not None:
            remaining -= len(block)
        yield block
        if len(block) < want:
            return


def ffmpeg_binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise DecodeError("unreadable", f"{name} not found on PATH: install ffmpeg to read m4a/mp4/aac/webm audio")
    return binary


def ffmpeg_words(stderr: str, path: Path) -> str:
    """ffmpeg's own message: its last lines, without the path and ``[demuxer @ 0x...]`` prefixes."""
    lines = []
    for line in stderr.strip().splitlines()[-3:]:
        line = re.sub(r"^\[[^\]]* @ 0x[0-9a-f]+\] ", "", line.strip())
        line = line[len(str(path)) + 2:] if line.startswith(f"{path}: ") else line
        if line and line not in lines:
            lines.append(line)
    return "; ".join(lines)[-300:] or "no message"


def ffprobe(path: Path) -> dict:
    """The first audio stream's ``sample_rate``, ``channels``, ``codec_name`` and a ``duration`` (the
    stream's, else the container's; ``None`` when neither says), from the headers."""
    try:
        result = subprocess.run(
            [ffmpeg_binary("ffprobe"), "-v", "error", "-select_streams", "a:0", "-show_entries",
             "stream=sample_rate,channels,codec_name,duration:format=duration", "-of", "json", str(path)],
            capture_output=True, text=True, check=False, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DecodeError("decode_timeout", f"ffprobe: no answer in {PROBE_TIMEOUT_S:g} s") from None
    found = json.loads(result.stdout or "{}") if result.returncode == 0 else {}
    streams = found.get("streams") or []
    if not streams or "sample_rate" not in streams[0] or "channels" not in streams[0]:
        why = ffmpeg_words(result.stderr, path) if result.stderr.strip() else "no audio stream"
        raise DecodeError("unreadable", f"ffmpeg: {why}")
    stream = streams[0]
    duration = stream.get("duration") or (found.get("format") or {}).get("duration")
    return {"sample_rate": int(stream["sample_rate"]), "channels": int(stream["channels"]),
            "codec_name": str(stream.get("codec_name", "-")),
            "duration": None if duration in (None, "N/A") else float(duration)}


def ffmpeg_blocks(path: Path, rate_hz: int, channels: int, max_frames: int | None, *, timeout_s: float,
                  ignore_length: bool = False) -> Iterator[np.ndarray]:
    """``[frames, channels]`` float32 blocks decoded by ffmpeg at the file's own rate, at most ``max_frames`` frames; the process
    is killed at the budget or the deadline. ``ignore_length``: read a WAV's samples to the end of the
    file, past what its header declares."""
    command = [ffmpeg_binary("ffmpeg"), "-nostdin", "-v", "error", *(["-ignore_length", "1"] if ignore_length else []),
               "-i", str(path), "-map", "0:a:0", "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels),
               "-ar", str(rate_hz), "pipe:1"]
    frame_bytes = 4 * channels
    block_bytes = max(1, BLOCK_SAMPLES // channels) * frame_bytes
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            process.kill()

        timer = threading.Timer(timeout_s, expire)
        timer.start()
        stopped, remaining, carry = False, max_frames, b""
        try:
            while remaining is None or remaining > 0:
                chunk = process.stdout.read(block_bytes)
                if not chunk:
                    break
                chunk = carry + chunk
                usable = len(chunk) // frame_bytes * frame_bytes
                carry = chunk[usable:]
                block = np.frombuffer(chunk[:usable], dtype="<f4").reshape(-1, channels)
                if remaining is not None:
                    block = block[:remaining]
                    remaining -= len(block)
                if len(block):
                    yield block
            stopped = remaining is not None and remaining <= 0
        finally:
            timer.cancel()
            if process.poll() is None:
                process.kill()
            process.stdout.close()
            process.wait()
        if expired.is_set():
            raise DecodeError("decode_timeout", f"ffmpeg: still decoding after {timeout_s:g} s (the decode deadline)")
        if process.returncode != 0 and not stopped:
            errors.seek(0)
            raise DecodeError("unreadable", f"ffmpeg: {ffmpeg_words(errors.read(1 << 16).decode(errors='replace'), path)}")
