"""Audio decoding (soundfile and the ffmpeg CLI), mono, resampling, FLAC, and typed rejects."""

from __future__ import annotations

import io
import os
import subprocess

import numpy as np
import pytest
import soundfile as sf

from posttrain.data import audio
from posttrain.data.decoders import native_stderr_captured


def _tone(rate_hz: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _aligned_correlation(decoded: np.ndarray, source: np.ndarray, window: int = 4096) -> float:
    """Correlation of a middle window of ``source`` with ``decoded`` at the best lag (codec delay)."""
    start = len(source) // 4
    piece = source[start:start + window]
    lags = np.correlate(decoded[: start + 2 * window], piece, mode="valid")
    at = int(np.argmax(lags))
    return float(np.corrcoef(decoded[at:at + window], piece)[0, 1])


@pytest.mark.parametrize("extension,file_format,subtype,exact", [
    ("wav", "WAV", "FLOAT", True), ("flac", "FLAC", "PCM_24", False), ("ogg", "OGG", "VORBIS", False),
    ("mp3", "MP3", "MPEG_LAYER_III", False)])
def test_soundfile_formats_from_path_and_bytes(tmp_path, extension, file_format, subtype, exact):
    stereo = np.stack([_tone(22050, 0.5), _tone(22050, 0.5, 660.0)], axis=1)
    path = tmp_path / f"x.{extension}"
    sf.write(path, stereo, 22050, format=file_format, subtype=subtype)
    from_path, rate = audio.decode(path)
    from_bytes, rate_b = audio.decode(path.read_bytes())
    assert rate == rate_b == 22050 and from_path.shape[1] == 2
    np.testing.assert_array_equal(from_path, from_bytes)
    if exact:
        np.testing.assert_array_equal(from_path, stereo)
    else:  # lossy codecs (mp3 adds encoder delay): same signal after aligning, per channel
        assert abs(len(from_path) - len(stereo)) < 0.1 * 22050
        for channel in range(2):
            assert _aligned_correlation(from_path[:, channel], stereo[:, channel]) > 0.99


def test_m4a_goes_through_ffmpeg(tmp_path):
    path = tmp_path / "x.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1:"
                    "sample_rate=44100", "-ac", "2", "-c:a", "aac", "-b:a", "96k", str(path)], check=True)
    with pytest.raises(sf.LibsndfileError):
        sf.read(path)  # soundfile refuses it, so this really exercises the ffmpeg path
    samples, rate = audio.decode(path)
    assert rate == 44100 and samples.shape[1] == 2
    assert abs(len(samples) - 44100) < 2048  # AAC frames of 1024 samples
    reference = np.sin(2 * np.pi * 440 * np.arange(len(samples)) / 44100)
    assert _aligned_correlation(samples[:, 0], reference) > 0.99
    assert _aligned_correlation(samples[:, 1], reference) > 0.99
    from_bytes, _ = audio.decode(path.read_bytes())
    np.testing.assert_array_equal(samples, from_bytes)
    wave = audio.load(path)
    assert wave.sample_rate_hz == 16000 and wave.orig_sample_rate_hz == 44100 and wave.samples.ndim == 1


def test_missing_ffmpeg_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2", "-c:a", "aac",
                    str(path)], check=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(audio.AudioError, match="ffprobe not found on PATH: install ffmpeg") as caught:
        audio.decode(path)
    assert caught.value.reason == "unreadable"


def test_mono_is_the_channel_mean():
    left, right = _tone(16000, 0.1), _tone(16000, 0.1, 1000.0)
    np.testing.assert_allclose(audio.to_mono(np.stack([left, right], axis=1)), (left + right) / 2, atol=1e-7)
    np.testing.assert_array_equal(audio.to_mono(left[:, None]), left)


def test_flac_round_trip_is_16_bit_exact():
    signal = np.random.default_rng(0).uniform(-0.9, 0.9, 16000).astype(np.float32)
    data = audio.encode_flac(signal)
    assert data[:4] == b"fLaC"
    decoded, rate = audio.decode_flac(data)
    assert rate == 16000 and len(decoded) == 16000
    assert np.abs(decoded - signal).max() <= 1.0 / 32768


def test_bad_audio_raises_typed_reasons(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really audio" * 20)
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    nan = _tone(16000, 0.5)
    nan[10] = np.inf
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(tmp_path / "short.wav", _tone(16000, 0.05), 16000)
    (tmp_path / "zero.wav").write_bytes(b"")
    cases = {"garbage.wav": "unreadable", "missing.wav": "missing", "empty.wav": "empty", "zero.wav": "empty",
             "nan.wav": "nan", "short.wav": "too_short"}
    for name, reason in cases.items():
        with pytest.raises(audio.AudioError) as caught:
            audio.load(tmp_path / name, min_seconds=0.1)
        assert caught.value.reason == reason and name in str(caught.value), (name, caught.value)
    assert audio.load(tmp_path / "short.wav", min_seconds=0.01).samples.shape == (800,)


def test_unreadable_says_what_the_decoder_said_and_decoder_chatter_stays_off_the_console(tmp_path, capfd):
    for name, codec in (("clip.m4a", "aac"), ("clip.mp3", "libmp3lame")):
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=1.5",
                        "-c:a", codec, str(tmp_path / name)], check=True)
    (tmp_path / "cut.m4a").write_bytes((tmp_path / "clip.m4a").read_bytes()[:1500])  # no moov atom
    with pytest.raises(audio.AudioError) as caught:
        audio.decode(tmp_path / "cut.m4a")
    assert caught.value.reason == "unreadable" and str(tmp_path / "cut.m4a") in caught.value.detail
    assert "moov atom not found" in caught.value.detail  # ffmpeg's own words about this file
    assert "possibly a pipe" not in caught.value.detail and "Format not recognised" not in caught.value.detail

    # A cut mp3 makes libmpg123 (inside libsndfile) print "Warning: Xing stream size off ..." on fd 2.
    (tmp_path / "cut.mp3").write_bytes((tmp_path / "clip.mp3").read_bytes()[:2000])
    # Its Xing frame count promises 1.5 s, the data holds 0.24 s: truncated, refused with both lengths.
    capfd.readouterr()
    with pytest.raises(audio.AudioError, match=r"truncated.*0\.24 s of the 1\.50 s") as caught:
        audio.decode(tmp_path / "cut.mp3")
    assert caught.value.reason == "truncated"
    assert "Xing" not in capfd.readouterr().err
    with native_stderr_captured():  # what is not decoder chatter still reaches stderr
        os.write(2, b"Warning: Xing stream size off\nsomething else\n")
    assert capfd.readouterr().err == "something else\n"


def test_decode_flac_into_a_window_equals_the_slice_of_a_full_decode():
    """The training loader decodes windows straight into batch rows, seeking inside the FLAC
    (20,000 samples: five 4,096-sample FLAC blocks); every window, at a block edge or not, equals the
    same slice of a whole-file decode (``sf.read``, independent of the seek path); a stereo file is
    the channel mean; a window past the end raises."""
    rng = np.random.default_rng(0)
    mono = (0.3 * rng.standard_normal(20000)).clip(-1, 1).astype(np.float32)
    data = audio.encode_flac(mono)
    whole, _ = sf.read(io.BytesIO(data), dtype="float32")
    for start, length in [(0, 20000), (0, 100), (4095, 2), (4096, 4096), (12345, 7000), (19999, 1)]:
        out = np.full(length, np.nan, dtype=np.float32)
        assert audio.decode_flac_into(data, out, start) == (16000, 20000)
        np.testing.assert_array_equal(out, whole[start:start + length])
    with pytest.raises(ValueError, match="ends 10 frames before the window"):
        audio.decode_flac_into(data, np.zeros(110, dtype=np.float32), 19900)

    stereo = np.stack([mono, -0.5 * mono], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 16000, format="FLAC", subtype="PCM_16")
    both, _ = sf.read(io.BytesIO(buffer.getvalue()), dtype="float32")
    out = np.empty(500, dtype=np.float32)
    audio.decode_flac_into(buffer.getvalue(), out, 9000)
    np.testing.assert_array_equal(out, both.mean(axis=1, dtype=np.float32)[9000:9500])
