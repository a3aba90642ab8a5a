"""Headers that lie about their length: the data decides. A header that understates its file is decoded by
the data (ffmpeg) and said so in a warning; one that overstates it is truncated; honest files, streamed
WAVs (placeholder sizes) and trailing metadata are left alone; decoding stops at the budget."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from posttrain.bench.hostile_audio import flac_declaring, mp3_behind_short_xing, tone, wav_header
from posttrain.data import audio
from posttrain.data.audio_extent import extent


def _pcm(seconds: float, rate_hz: int = 8000) -> bytes:
    return (tone(seconds, rate_hz) * 32767).astype("<i2").tobytes()


def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_a_wav_whose_data_chunk_understates_the_file_is_decoded_whole(tmp_path):
    pcm = _pcm(3.0)
    path = _write(tmp_path, "under.wav", wav_header(8000, 8000 * 2) + pcm)  # the chunk says 1 s of the 3
    assert sf.info(str(path)).frames == 8000  # libsndfile believes the header
    assert extent(path, "WAV").counted == 24000
    wave = audio.load(path)
    assert wave.orig_sample_rate_hz == 8000 and wave.seconds == pytest.approx(3.0, abs=1e-3)
    (warning,) = wave.warnings
    assert "the header says 1.00 s, the data holds 3.00 s" in warning
    reference, _ = sf.read(io.BytesIO(wav_header(8000, len(pcm)) + pcm), dtype="float32")
    honest = audio.load(_write(tmp_path, "honest.wav", wav_header(8000, len(pcm)) + pcm))
    np.testing.assert_array_equal(wave.samples, honest.samples)  # the same samples, by another decoder
    assert honest.warnings == () and len(reference) == 24000


def test_a_wav_that_overstates_is_truncated_and_placeholders_and_trailing_chunks_are_honest(tmp_path):
    pcm = _pcm(1.0)
    with pytest.raises(audio.AudioError, match=r"truncated.*1\.00 s of the 3\.00 s") as caught:
        audio.load(_write(tmp_path, "over.wav", wav_header(8000, 3 * len(pcm)) + pcm))
    assert caught.value.reason == "truncated"
    for placeholder in (0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000):  # ffmpeg/sox, others, espeak-ng piping a WAV
        head = bytearray(wav_header(8000, len(pcm)))
        head[40:44] = struct.pack("<I", placeholder)
        wave = audio.load(_write(tmp_path, f"stream{placeholder:x}.wav", bytes(head) + pcm))
        assert wave.seconds == pytest.approx(1.0) and wave.warnings == ()
    listed = wav_header(8000, len(pcm)) + pcm + b"LIST" + struct.pack("<I", 10) + b"INFOISFT\x00\x00"
    path = _write(tmp_path, "list.wav", listed)
    assert extent(path, "WAV").counted == 8000
    assert audio.load(path).warnings == ()


def test_a_flac_whose_streaminfo_understates_is_decoded_whole(tmp_path):
    path = _write(tmp_path, "under.flac", flac_declaring(12.0, 8000))
    assert sf.info(str(path)).frames == 8000
    assert extent(path, "FLAC").counted == 96000
    wave = audio.load(path)
    assert wave.seconds == pytest.approx(12.0, abs=1e-3) and len(wave.warnings) == 1
    honest = audio.load(_write(tmp_path, "honest.flac", flac_declaring(12.0, 96000)))
    np.testing.assert_array_equal(wave.samples, honest.samples)
    assert honest.warnings == ()
    tagged = _write(tmp_path, "tagged.flac", flac_declaring(12.0, 96000) + b"TAG" + b"\x00" * 125)  # ID3v1
    assert extent(tagged, "FLAC").counted == 96000
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load(_write(tmp_path, "over.flac", flac_declaring(2.0, 8000 * 60)))


def test_an_mp3_behind_a_short_xing_header_and_a_vbr_mp3_without_one_are_decoded_whole(tmp_path):
    path = _write(tmp_path, "xing.mp3", mp3_behind_short_xing(tmp_path, 8.0))
    assert sf.info(str(path)).frames == 16000
    wave = audio.load(path)
    assert wave.seconds == pytest.approx(9.0, abs=0.15) and "length_mismatch" in wave.warnings[0]
    import subprocess

    vbr = tmp_path / "vbr.mp3"  # quiet first half: libsndfile extrapolates the length from the first frames
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "anoisesrc=d=10:r=44100:a=0.5",
                    "-af", "volume='if(lt(t,5),0.001,1)':eval=frame", "-c:a", "libmp3lame", "-q:a", "2",
                    "-write_xing", "0", str(vbr)], check=True)
    assert sf.info(str(vbr)).frames < 0.6 * 441000
    assert audio.load(vbr).seconds == pytest.approx(10.0, abs=0.1)
    cut = _write(tmp_path, "cut.mp3", path.read_bytes()[:3000])  # the Xing frame count promises more
    with pytest.raises(audio.AudioError, match="truncated"):
        audio.load(cut)


def test_decoding_stops_at_the_budget(tmp_path):
    path = _write(tmp_path, "long.flac", flac_declaring(30.0, 8000 * 30))
    with pytest.raises(audio.AudioError, match=r"more than 10 s of audio decoded") as caught:
        audio.load(path, max_seconds=10.0)
    assert caught.value.reason == "too_long"
    assert audio.load(path, max_seconds=30.0).seconds == pytest.approx(30.0)  # exactly the limit passes
    understated = _write(tmp_path, "under.flac", flac_declaring(30.0, 8000))
    with pytest.raises(audio.AudioError, match="too_long"):  # the ffmpeg path stops at the budget too
        audio.load(understated, max_seconds=10.0)


def test_a_rate_out_of_range_is_refused_from_the_header(tmp_path):
    path = _write(tmp_path, "evil.wav", wav_header(2_147_483_647, 96) + b"\x00" * 96)
    with pytest.raises(audio.AudioError, match="2,147,483,647 Hz is outside") as caught:
        audio.probe(path)
    assert caught.value.reason == "rate_out_of_range" and str(path) in caught.value.detail
