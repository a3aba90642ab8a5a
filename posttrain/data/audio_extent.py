"""How many frames a file's data holds, counted from the data itself rather than its header's length field.

libsndfile stops where a header says the audio ends: a WAV ``data`` chunk size, a FLAC STREAMINFO
sample count or an MP3 Xing/Info frame count that understates the file is decoded only in part, and
the rest goes unscored without a word. ``data_frames`` reads just enough of the file to count what is
really there (the RIFF chunk layout, the last FLAC frame's header, the MPEG frame headers), so the
caller can tell an honest header from a lying one and decode by the data instead.

Each parser returns ``None`` when it cannot tell (an unknown layout, junk where frames should be): the
caller then decodes with a decoder that follows the data (ffmpeg) and compares. Work is bounded: at
most ``MAX_CHUNKS`` RIFF chunks, a FLAC tail of ``FLAC_TAIL_BYTES``, one pass over MPEG headers.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_CHUNKS = 4096
# Writers that stream a WAV to a pipe cannot fill in its length and put a placeholder there: 0xFFFFFFFF
# (ffmpeg, sox), 0x7FFFFFFF, 0x7FFFF000 (espeak-ng). Such a length means "to the end of the file".
STREAMED_WAV_LENGTH = 0x7FFF0000
FLAC_TAIL_BYTES = 1 << 20


@dataclass(frozen=True)
class Extent:
    """``counted``: frames the data holds; ``declared``: frames the header's own length field claims where
    this module reads it (a WAV ``data`` chunk: libsndfile quietly clamps that one to the file), else
    ``None`` (libsndfile's count is the claim). Either is ``None`` when it cannot be told."""

    counted: int | None
    declared: int | None = None


def extent(path: str | Path, container: str) -> Extent | None:
    """The extent of ``path`` (``container``: libsndfile's format name, e.g. ``"WAV"``), or ``None`` for
    a container not checked here."""
    parser = _PARSERS.get(container.upper())
    if parser is None:
        return None
    with open(path, "rb") as handle:
        found = parser(handle, os.fstat(handle.fileno()).st_size)
    return found if isinstance(found, Extent) else Extent(found)


# ---------------------------------------------------------------------------------- RIFF WAVE


def _wav_frames(handle, size: int) -> Extent | None:
    """Frames from the ``data`` chunk's start to where the data really ends: the declared end when
    only well-formed chunks follow it, the end of the file when what follows is not chunks (more
    samples than the header admits) or when the chunk overstates its size."""
    head = handle.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, block_align, data = 12, None, None
    for _ in range(MAX_CHUNKS):
        handle.seek(position)
        chunk = handle.read(8)
        if len(chunk) < 8:
            break
        kind, length = chunk[:4], int.from_bytes(chunk[4:8], "little")
        if kind == b"fmt ":
            fmt = handle.read(16)
            block_align = int.from_bytes(fmt[12:14], "little") if len(fmt) == 16 else None
        elif kind == b"data":
            data = (position + 8, length)
            break
        position += 8 + length + (length & 1)
    if not block_align or data is None:
        return None
    start, length = data
    to_the_end = (size - start) // block_align
    if length == 0 or length >= STREAMED_WAV_LENGTH:  # a streamed WAV: its size is a placeholder
        return Extent(to_the_end)
    end = start + length + (length & 1)
    if end >= size or not _only_chunks_follow(handle, end, size):
        return Extent(to_the_end, length // block_align)
    return Extent(length // block_align, length // block_align)


def _only_chunks_follow(handle, position: int, size: int) -> bool:
    for _ in range(MAX_CHUNKS):
        if position >= size - 1:  # the end, or one pad byte
            return True
        handle.seek(position)
        chunk = handle.read(8)
        if len(chunk) < 8 or not all(32 <= byte < 127 for byte in chunk[:4]):
            return False
        length = int.from_bytes(chunk[4:8], "little")
        position += 8 + length + (length & 1)
        if position > size + 1:
            return True  # a metadata chunk cut short (a partial download's tail): still not samples
    return False


# ---------------------------------------------------------------------------------- FLAC


def _flac_frames(handle, size: int) -> int | None:
    """The end of the last frame (its first sample + its block size): every FLAC frame header carries
    its position, so the last one in the file says how long the data is, whatever STREAMINFO claims."""
    start = _skip_id3v2(handle)
    handle.seek(start)
    if handle.read(4) != b"fLaC":
        return None
    streaminfo = None
    while True:
        block = handle.read(4)
        if len(block) < 4:
            return None
        kind, length = block[0] & 0x7F, int.from_bytes(block[1:4], "big")
        body = handle.read(length)
        if kind == 0 and len(body) >= 34:
            streaminfo = body
        if block[0] & 0x80:
            break
    if streaminfo is None:
        return None
    audio_start = handle.tell()
    packed = int.from_bytes(streaminfo[10:18], "big")
    channels, bits = ((packed >> 41) & 0x7) + 1, ((packed >> 36) & 0x1F) + 1
    # a fixed-blocksize stream numbers frames, not samples: the first frame's size is the stream's
    # block size (STREAMINFO's own minimum is a header field like the length, so it is not trusted)
    first = _flac_frame_header(handle.read(32), 0, 1, channels, bits)
    if first is None:
        return None
    tail_start = max(audio_start, size - FLAC_TAIL_BYTES)
    handle.seek(tail_start)
    tail = handle.read(size - tail_start)
    end = len(tail) - 128 if tail[-128:-125] == b"TAG" else len(tail)  # an ID3v1 tag some taggers append
    syncs = [match.start() for match in _FLAC_SYNC.finditer(tail)]
    boundaries = sorted({*syncs, end})
    for candidate in reversed(syncs):
        header = _flac_frame_header(tail, candidate, first[1], channels, bits)
        if header is not None and _crc16_closes(tail, candidate, [b for b in boundaries if b > candidate]):
            first_sample, block_size = header
            return first_sample + block_size
    return None


_FLAC_SYNC = re.compile(b"\xff[\xf8\xf9]")


_BLOCK_SIZES = {1: 192, **{code: 576 << (code - 2) for code in range(2, 6)},
                **{code: 256 << (code - 8) for code in range(8, 16)}}
_SAMPLE_SIZE_BITS = {1: 8, 2: 12, 4: 16, 5: 20, 6: 24, 7: 32}


def _flac_frame_header(data: bytes, at: int, min_block: int, channels: int, bits: int) -> tuple[int, int] | None:
    """``(first sample, block size)`` of a frame header at ``at`` that is valid and fits the stream."""
    if at + 6 > len(data):
        return None
    variable = data[at + 1] & 1
    block_code, rate_code = data[at + 2] >> 4, data[at + 2] & 0xF
    channel_code, size_code = data[at + 3] >> 4, (data[at + 3] >> 1) & 0x7
    if block_code == 0 or rate_code == 15 or channel_code > 10 or data[at + 3] & 1 or size_code == 3:
        return None
    if (channel_code + 1 if channel_code < 8 else 2) != channels:
        return None
    if size_code and _SAMPLE_SIZE_BITS.get(size_code) != bits:
        return None
    number, position = _utf8_number(data, at + 4)
    if number is None:
        return None
    block_size = _BLOCK_SIZES.get(block_code)
    if block_code in (6, 7):
        width = block_code - 5
        block_size = int.from_bytes(data[position:position + width], "big") + 1
        position += width
    position += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if position >= len(data) or _crc8(data[at:position]) != data[position]:
        return None
    return (number if variable else number * min_block), block_size


def _utf8_number(data: bytes, at: int) -> tuple[int | None, int]:
    """FLAC's UTF-8-like coded frame or sample number at ``at``: ``(value, position after it)``."""
    if at >= len(data):
        return None, at
    first = data[at]
    if first < 0x80:
        return first, at + 1
    extra = next((n for n in range(1, 7) if first & (0x80 >> (n + 1)) == 0), None)
    if extra is None or first & 0x40 == 0 or at + 1 + extra > len(data):
        return None, at
    value = first & (0x3F >> extra)
    for byte in data[at + 1:at + 1 + extra]:
        if byte & 0xC0 != 0x80:
            return None, at
        value = (value << 6) | (byte & 0x3F)
    return value, at + 1 + extra


def _crc_table(poly: int, width: int) -> list[int]:
    top, mask = 1 << (width - 1), (1 << width) - 1
    table = []
    for byte in range(256):
        crc = byte << (width - 8)
        for _ in range(8):
            crc = ((crc << 1) ^ poly) & mask if crc & top else (crc << 1) & mask
        table.append(crc)
    return table


_CRC8, _CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc


def _crc16_closes(data: bytes, start: int, boundaries: list[int]) -> bool:
    """True when the frame from ``start`` ends at one of ``boundaries`` with a matching CRC-16 (the
    CRC of a frame including its own stored CRC is 0)."""
    crc, position = 0, start
    for boundary in boundaries:
        for byte in data[position:boundary]:
            crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
        position = boundary
        if crc == 0:
            return True
    return False


def _skip_id3v2(handle) -> int:
    handle.seek(0)
    head = handle.read(10)
    if len(head) == 10 and head[:3] == b"ID3":
        size = (head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9]
        return 10 + size + (10 if head[5] & 0x10 else 0)
    return 0


# ---------------------------------------------------------------------------------- MPEG audio


_MPEG_BITRATES_KBPS = {  # (MPEG-1?, layer) -> bitrate index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MPEG_RATES_HZ = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mpeg_frame(data: bytes, at: int) -> tuple[int, int] | None:
    """``(frame bytes, samples per frame)`` of a valid MPEG audio frame header at ``at``."""
    if at + 4 > len(data) or data[at] != 0xFF or data[at + 1] & 0xE0 != 0xE0:
        return None
    version, layer_bits = (data[at + 1] >> 3) & 3, (data[at + 1] >> 1) & 3
    bitrate_index, rate_index, padding = data[at + 2] >> 4, (data[at + 2] >> 2) & 3, (data[at + 2] >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None  # reserved values, or free format (no length in the header)
    mpeg1, layer = version == 3, 4 - layer_bits
    bitrate = _MPEG_BITRATES_KBPS[(mpeg1, layer)][bitrate_index - 1] * 1000
    rate = _MPEG_RATES_HZ[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + padding) * 4, 384
    samples = 1152 if layer == 2 or mpeg1 else 576
    return samples // 8 * bitrate // rate + padding, samples


def _is_info_frame(data: bytes, at: int) -> bool:
    """A Xing/Info/VBRI frame: the encoder's table of contents, silent, not counted by decoders."""
    mpeg1, mono = (data[at + 1] >> 3) & 3 == 3, data[at + 3] >> 6 == 3
    offset = at + 4 + ((17 if mono else 32) if mpeg1 else (9 if mono else 17))
    return data[offset:offset + 4] in (b"Xing", b"Info") or data[at + 36:at + 40] == b"VBRI"


def _mp3_frames(handle, size: int) -> int | None:
    """Samples of every MPEG frame in the file (two consecutive valid headers to re-sync after junk)."""
    if size == 0:
        return None
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return _count_mpeg_samples(data, _skip_id3v2(handle), size)


def _count_mpeg_samples(data, at: int, end: int) -> int | None:
    if data[-128:-125] == b"TAG":
        end -= 128
    samples, first = 0, True
    while at < end:
        frame = _mpeg_frame(data, at)
        if frame is None or (at + frame[0] < end and _mpeg_frame(data, at + frame[0]) is None and not first):
            found = data.find(b"\xff", at + 1, end)
            if found < 0:
                break
            at = found
            continue
        if first and frame is not None and _is_info_frame(data, at):
            first = False
            at += frame[0]
            continue
        first = False
        samples += frame[1]
        at += frame[0]
    return samples or None


_PARSERS = {"WAV": _wav_frames, "WAVEX": _wav_frames, "FLAC": _flac_frames, "MP3": _mp3_frames}
