"""The one resampler of the package: any input rate from ``MIN_RATE_HZ`` to ``MAX_RATE_HZ``, in memory
and time proportional to the audio, whatever the two rates' greatest common divisor.

Two paths, chosen by the input rate and the reduced ratio ``new / gcd : orig / gcd`` (``resampler_path``):

``torchaudio``  ``torchaudio.functional.resample``'s windowed sinc, bit for bit, for the speech rates up to
                48 kHz whose kernel is small: the reduced new rate is at most ``TORCHAUDIO_MAX_NEW_REDUCED``
                (1000) and the kernel holds at most ``TORCHAUDIO_MAX_KERNEL`` elements. Every common
                speech rate takes it (8, 11.025, 12, 16, 22.05, 24, 32, 44.1, 48 kHz): AntiDeepfake
                resamples with torchaudio, so these results stay exactly where AntiDeepfake's are.
``soxr``        libsoxr ("HQ") elsewhere: odd rates (16,001 Hz, 44,101 Hz, ...), where torchaudio's kernel
                grows with the product of the reduced rates (16,001 -> 16,000 Hz: 16,000 x 16,015 taps,
                9.5 GB), and studio rates above 48 kHz (88.2, 96, 176.4, 192, 384 kHz), where torchaudio's
                kernel and its whole-file convolution cost 2.7x the CPU and 1.8x the memory per audio
                second of 48 kHz (``python -m posttrain.bench audio``). soxr resamples a stream chunk by
                chunk with the same output as one call, so only the 16 kHz output is held.
                ``POSTTRAIN_RESAMPLER=torchaudio`` sends the rates above 48 kHz back to torchaudio (exact
                AntiDeepfake parity there, at that cost).

A rate outside the range is refused before any work (``RateError``): a header claiming 2,147,483,647 Hz
costs nothing. ``docs/parity.md`` lists which rates take which path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ

MIN_RATE_HZ = 1_000
MAX_RATE_HZ = 384_000
TORCHAUDIO_MAX_RATE_HZ = 48_000  # above it, soxr unless RESAMPLER_ENV says torchaudio
RESAMPLER_ENV = "POSTTRAIN_RESAMPLER"
TORCHAUDIO_MAX_NEW_REDUCED = 1000
TORCHAUDIO_MAX_KERNEL = 1 << 20  # elements of torchaudio's [new_reduced, 1, 2 * width + orig_reduced] kernel
# torchaudio.functional.resample's defaults, which AntiDeepfake uses
_LOWPASS_FILTER_WIDTH, _ROLLOFF = 6, 0.99
SOXR_QUALITY = "HQ"


class RateError(ValueError):
    """A sample rate outside ``[MIN_RATE_HZ, MAX_RATE_HZ]``."""

    def __init__(self, rate_hz: float, source: str):
        self.rate_hz = rate_hz
        shown = f"{rate_hz:,.0f}" if float(rate_hz).is_integer() else f"{rate_hz:g}"
        super().__init__(f"{source}: sample rate {shown} Hz is outside the {MIN_RATE_HZ:,}-{MAX_RATE_HZ:,} Hz "
                         f"this package resamples")


def check_rate(rate_hz: float, source: str = "audio") -> int:
    """``rate_hz`` as an int, or ``RateError`` when it is out of range (or not a whole number)."""
    if not (MIN_RATE_HZ <= rate_hz <= MAX_RATE_HZ) or rate_hz != int(rate_hz):
        raise RateError(rate_hz, source)
    return int(rate_hz)


def torchaudio_kernel_size(orig_hz: int, new_hz: int) -> tuple[int, int]:
    """``(reduced new rate, kernel elements)`` of ``torchaudio.functional.resample`` for this ratio
    (its ``_get_sinc_resample_kernel`` shape, computed without building it)."""
    gcd = math.gcd(orig_hz, new_hz)
    orig_reduced, new_reduced = orig_hz // gcd, new_hz // gcd
    base = min(orig_reduced, new_reduced) * _ROLLOFF
    width = math.ceil(_LOWPASS_FILTER_WIDTH * orig_reduced / base)
    return new_reduced, new_reduced * (2 * width + orig_reduced)


def resampler_path(orig_hz: int, new_hz: int = SAMPLE_RATE_HZ) -> str:
    """``"none"`` (same rate), ``"torchaudio"`` or ``"soxr"`` (module docstring)."""
    if orig_hz == new_hz:
        return "none"
    new_reduced, kernel = torchaudio_kernel_size(orig_hz, new_hz)
    if new_reduced > TORCHAUDIO_MAX_NEW_REDUCED or kernel > TORCHAUDIO_MAX_KERNEL:
        return "soxr"
    if orig_hz > TORCHAUDIO_MAX_RATE_HZ and os.environ.get(RESAMPLER_ENV, "").lower() != "torchaudio":
        return "soxr"
    return "torchaudio"


def resample(samples: np.ndarray, orig_hz: int, new_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Resample a 1-D float32 signal (the input itself when the rates are equal)."""
    orig_hz, new_hz = check_rate(orig_hz), check_rate(new_hz)
    path = resampler_path(orig_hz, new_hz)
    if path == "none":
        return samples
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if path == "soxr":
        import soxr

        return soxr.resample(samples, orig_hz, new_hz, quality=SOXR_QUALITY).astype(np.float32, copy=False)
    import torch  # imported here so decoding shards does not pay for torch
    import torchaudio

    # the functional form, as AntiDeepfake calls it (torchaudio.transforms.Resample builds its kernel in
    # another precision and differs in the last bit); its kernel is bounded by TORCHAUDIO_MAX_KERNEL
    with torch.inference_mode():
        return torchaudio.functional.resample(torch.from_numpy(samples), orig_hz, new_hz).numpy()


@dataclass
class StreamResampler:
    """Feed mono blocks as they are decoded, ``finish()`` for the resampled whole; equal to ``resample``
    of the concatenated blocks. The soxr path resamples as it goes (only the output is kept); the
    torchaudio path keeps the input and resamples once at the end, because its output depends on how the
    signal is cut (chunked convolutions differ in the last bits)."""

    orig_hz: int
    new_hz: int = SAMPLE_RATE_HZ

    def __post_init__(self):
        self.orig_hz, self.new_hz = check_rate(self.orig_hz), check_rate(self.new_hz)
        self.path = resampler_path(self.orig_hz, self.new_hz)
        self._parts: list[np.ndarray] = []
        self._stream = None
        if self.path == "soxr":
            import soxr

            self._stream = soxr.ResampleStream(self.orig_hz, self.new_hz, 1, dtype="float32", quality=SOXR_QUALITY)

    def feed(self, block: np.ndarray) -> None:
        if self._stream is not None:
            self._parts.append(self._stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32)))
        else:
            self._parts.append(np.asarray(block, dtype=np.float32))

    def finish(self) -> np.ndarray:
        if self._stream is not None:
            self._parts.append(self._stream.resample_chunk(np.zeros(0, np.float32), last=True))
        whole = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        self._parts = []
        return whole if self._stream is not None else resample(whole, self.orig_hz, self.new_hz)
