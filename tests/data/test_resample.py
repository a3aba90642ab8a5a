"""The one resampler: torchaudio's output bit for bit at the common rates (AntiDeepfake resamples with it),
libsoxr where torchaudio's kernel would grow with the rates' product, a bounded kernel everywhere, rates
out of range refused before any work, and the streaming form equal to one call."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torchaudio

from posttrain.data.resample import (MAX_RATE_HZ, MIN_RATE_HZ, TORCHAUDIO_MAX_KERNEL, RateError, StreamResampler,
                                     check_rate, resample, resampler_path, torchaudio_kernel_size)

COMMON_RATES_HZ = (1000, 8000, 11025, 12000, 22050, 24000, 32000, 44100, 48000)
STUDIO_RATES_HZ = (88200, 96000, 176400, 192000, 384000)
ODD_RATES_HZ = (1001, 8001, 16001, 44101, 47999, 383999)


def _signal(rate_hz: int, seconds: float = 1.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate_hz * seconds)) / rate_hz
    wave = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * (100 * t + 1200 * t**2))
    return (wave + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("rate_hz", COMMON_RATES_HZ)
def test_common_rates_are_torchaudio_bit_for_bit(rate_hz):
    assert resampler_path(rate_hz) == "torchaudio"
    signal = _signal(rate_hz)
    expected = torchaudio.functional.resample(torch.from_numpy(signal), rate_hz, 16000).numpy()
    np.testing.assert_array_equal(resample(signal, rate_hz), expected)


@pytest.mark.parametrize("rate_hz", STUDIO_RATES_HZ)
def test_studio_rates_take_soxr_unless_asked_for_torchaudio(rate_hz, monkeypatch):
    assert resampler_path(rate_hz) == "soxr"
    monkeypatch.setenv("POSTTRAIN_RESAMPLER", "torchaudio")  # AntiDeepfake's exact output, at its cost
    assert resampler_path(rate_hz) == "torchaudio"
    signal = _signal(rate_hz, seconds=0.4)
    expected = torchaudio.functional.resample(torch.from_numpy(signal), rate_hz, 16000).numpy()
    np.testing.assert_array_equal(resample(signal, rate_hz), expected)


@pytest.mark.parametrize("rate_hz", ODD_RATES_HZ + STUDIO_RATES_HZ)
def test_odd_and_studio_rates_take_soxr_and_match_an_independent_polyphase_resampler(rate_hz):
    """torchaudio's kernel for the odd rates would hold new_reduced x (orig_reduced + 2 width) taps (16,001
    Hz: 16,000 x 16,015); soxr's output agrees with scipy's polyphase filter away from the edges."""
    assert resampler_path(rate_hz) == "soxr"
    new_reduced, kernel = torchaudio_kernel_size(rate_hz, 16000)
    assert new_reduced > 1000 or kernel > TORCHAUDIO_MAX_KERNEL or rate_hz > 48000
    t = np.arange(2 * rate_hz) / rate_hz
    band = min(rate_hz, 16000) / 2  # tones well inside both passbands: the two filters must agree
    signal = sum(0.25 * np.sin(2 * np.pi * f * band * t + f) for f in (0.05, 0.21, 0.43)).astype(np.float32)
    ours = resample(signal, rate_hz)
    divisor = math.gcd(rate_hz, 16000)
    reference = scipy.signal.resample_poly(signal.astype(np.float64), 16000 // divisor, rate_hz // divisor)
    assert abs(len(ours) - len(reference)) <= 1
    inner = slice(800, min(len(ours), len(reference)) - 800)
    assert np.abs(ours[inner] - reference[inner]).max() < 5e-3


def test_every_rate_in_range_has_a_small_kernel_or_soxr():
    """Over every integer rate from 1 kHz to 384 kHz (sampled), the torchaudio path never builds a kernel
    beyond its bound: the cost of resampling is proportional to the audio, whatever the gcd."""
    rng = np.random.default_rng(1)
    for rate in [*COMMON_RATES_HZ, *ODD_RATES_HZ, *rng.integers(MIN_RATE_HZ, MAX_RATE_HZ, 3000)]:
        rate = int(rate)
        path = resampler_path(rate)
        new_reduced, kernel = torchaudio_kernel_size(rate, 16000)
        if path == "torchaudio":
            assert new_reduced <= 1000 and kernel <= TORCHAUDIO_MAX_KERNEL, rate
        else:
            assert path in ("soxr", "none"), rate


@pytest.mark.parametrize("rate_hz", [0, 999, 384_001, 2_147_483_647, 16000.5, -8000])
def test_rates_out_of_range_are_refused(rate_hz):
    with pytest.raises(RateError, match=r"outside the 1,000-384,000 Hz"):
        check_rate(rate_hz, "x.wav")
    with pytest.raises(RateError):
        resample(np.zeros(10, np.float32), rate_hz)


@pytest.mark.parametrize("rate_hz", [44100, 16001, 8000])
def test_streaming_in_blocks_equals_one_call(rate_hz):
    signal = _signal(rate_hz, seconds=3.1)
    stream = StreamResampler(rate_hz)
    for start in range(0, len(signal), 7919):  # blocks that share no structure with either rate
        stream.feed(signal[start:start + 7919])
    np.testing.assert_array_equal(stream.finish(), resample(signal, rate_hz))


def test_same_rate_is_the_input_itself():
    signal = _signal(16000)
    assert resample(signal, 16000) is signal
    stream = StreamResampler(16000)
    stream.feed(signal[:100])
    stream.feed(signal[100:])
    np.testing.assert_array_equal(stream.finish(), signal)
