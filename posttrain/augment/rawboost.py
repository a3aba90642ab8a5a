"""RawBoost (Tak et al., ICASSP 2022), batched in torch and seeded per sample.

Algorithms (``RawBoostConfig.algo``): 0 none, 1 LnL (linear and non-linear convolutive noise),
2 ISD (impulsive signal-dependent noise), 3 SSI (stationary signal-independent noise),
4 = 1->2->3, 5 = 1->2, 6 = 1->3, 7 = 2->3, 8 = peak-normalise(LnL(x) + ISD(x)).

The random draws (``RawBoostParams``) are separate from the signal processing (``RawBoost.apply``):
each sample's draws come from its own generator seeded by a stable hash of the *read*
``seed:sample_id:epoch:repeat`` (``repeat``: ``Batch.repeats``, which read of its shard within the
epoch delivered the sample, as for the crop), so a resumed run, both passes of a SAM step, both
paths of a dual-path step and every rank see the same augmentation of a read, whatever the batch it
lands in, while the repeats of an oversampled file within one epoch get different noise. The processing runs on the whole padded batch at once on any
device; every row is processed over its valid region only, as the per-clip reference code would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.config import RawBoostConfig
from posttrain.data.batch import Batch

USES_LNL = frozenset({1, 4, 5, 6, 8})
USES_ISD = frozenset({2, 4, 5, 7, 8})
USES_SSI = frozenset({3, 4, 6, 7})

# scipy.signal.freqz's default grid (worN=512 points on [0, pi)), over which the reference code
# normalises each notch cascade to unit peak gain before applying its random gain.
_FREQZ_POINTS = 512


def sample_seed(seed: int, sample_id: str, epoch: int, repeat: int = 0) -> int:
    """A 64-bit seed of one read that is the same in every process (Python's ``hash`` is salted per
    process)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{epoch}:{repeat}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# -------------------------------------------------------------------------------------------- draws


@dataclass
class NotchDraws:
    """Random draws of notch cascades: ``[..., n_bands]`` per band, ``gain_db [...]`` per cascade.

    ``coeffs`` is the reference's ``int(U[min_coeff, max_coeff])``; the filter has ``coeffs`` taps,
    one more when that is even.
    """

    center_hz: torch.Tensor
    bandwidth_hz: torch.Tensor
    coeffs: torch.Tensor
    gain_db: torch.Tensor


@dataclass
class RawBoostParams:
    """All random draws for one batch (rows in batch order); ``None`` for stages the algo skips.

    ``lnl``: ``[B, n_f, n_bands]`` notch draws (cascade j filters x^(j+1));
    ``isd_positions`` / ``isd_factors``: ``[B, K]`` distinct positions and factors
    ``(2U-1)(2U-1)``, padded with position 0 and factor 0 (which changes nothing);
    ``ssi``: ``[B, n_bands]`` notch draws for the noise colouring; ``ssi_snr_db [B]``;
    ``ssi_noise [B, T]``: standard normal noise, zero beyond each row's length.
    """

    lnl: NotchDraws | None = None
    isd_positions: torch.Tensor | None = None
    isd_factors: torch.Tensor | None = None
    ssi: NotchDraws | None = None
    ssi_snr_db: torch.Tensor | None = None
    ssi_noise: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RawBoostParams":
        def move(value):
            if isinstance(value, NotchDraws):
                return NotchDraws(*(t.to(device) for t in dataclasses.astuple(value)))
            return None if value is None else value.to(device)

        return RawBoostParams(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


def _notch_ranges(cfg: RawBoostConfig, num_cascades: int) -> list[tuple[float, float, int]]:
    """``(low, high, count)`` uniform ranges of one sample's notch draws, in ``NotchDraws`` order.

    ``coeffs`` is ``int(U[min_coeff, max_coeff])``; the non-linear gains (cascades j >= 1) are
    attenuated: U[minG - minBias, maxG - maxBias] dB (the reference allows high < low there).
    """
    bands = num_cascades * cfg.n_bands
    return [(cfg.min_f_hz, cfg.max_f_hz, bands), (cfg.min_bw_hz, cfg.max_bw_hz, bands),
            (cfg.min_coeff, cfg.max_coeff, bands), (cfg.min_g_db, cfg.max_g_db, 1),
            (cfg.min_g_db - cfg.min_bias_db, cfg.max_g_db - cfg.max_bias_db, num_cascades - 1)]


def _notches(parts: Sequence[torch.Tensor], cfg: RawBoostConfig, num_cascades: int) -> NotchDraws:
    """``NotchDraws`` ``[B, num_cascades, ...]`` from the ``[B, count]`` draws of ``_notch_ranges``."""
    center, bandwidth, coeffs, linear_gain, nonlinear_gain = parts
    shape = (-1, num_cascades, cfg.n_bands)
    return NotchDraws(center.reshape(shape), bandwidth.reshape(shape), coeffs.long().reshape(shape),
                      torch.cat([linear_gain, nonlinear_gain], dim=1))


class _SampleSampler:
    """One sample's draws from its own generator, in a fixed order: every uniform parameter of the
    algo in ONE call (``uniforms``), then the impulses, then the noise. Few large calls instead of
    many small ones keep the per-sample Python and dispatch cost low."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def uniforms(self, out: torch.Tensor) -> None:
        """Fills ``out`` with U[0, 1) float64 draws."""
        torch.rand(out.shape, generator=self.generator, dtype=torch.float64, out=out)

    def impulses(self, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate positions in ``[0, length)`` and ``count`` factors ``(2U-1)(2U-1)``, in one call.

        The impulses go to the first ``count`` distinct candidates (``_distinct_positions``), a
        uniformly random subset like the reference's ``permutation(length)[:count]`` at O(count)
        random numbers instead of O(length). The candidates carry a margin for repeats
        (~m^2 / (2 length) among m draws), so ``positions`` is rarely needed.
        """
        margin = count + 2 * count * count // max(length, 1) + 16
        draws = torch.rand(margin + 2 * count, generator=self.generator, dtype=torch.float64)
        first, second = 2 * draws[margin:].view(2, count) - 1
        return (draws[:margin] * length).long(), first * second

    def positions(self, length: int, number: int) -> torch.Tensor:
        """``number`` more candidate positions in ``[0, length)``."""
        return (torch.rand(number, generator=self.generator, dtype=torch.float64) * length).long()

    def noise(self, out: torch.Tensor) -> None:
        """Fills ``out`` with standard normal draws."""
        torch.randn(out.shape, generator=self.generator, out=out)


def _first_occurrences(candidates: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, M]`` mask of the valid candidates (values in ``[0, width)``) seen first in their row:
    one table per row holds the first draw index of each value, built for the whole batch at once."""
    order = torch.arange(candidates.shape[1], dtype=torch.int32).expand_as(candidates)
    first = torch.full((candidates.shape[0], width), candidates.shape[1], dtype=torch.int32)
    first.scatter_reduce_(1, candidates, order.masked_fill(~valid, candidates.shape[1]), "amin")
    return valid & (first.gather(1, candidates) == order)


def _distinct_positions(samplers: Sequence[_SampleSampler], candidates: list[torch.Tensor],
                        lengths: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    """``[B, max(counts)]`` first ``counts[i]`` distinct ``candidates[i]`` (draw order), padded with 0.

    A row short of distinct candidates draws more from its own sampler (rare: see ``impulses``).
    """
    width = max(max(lengths), 1)
    wanted = torch.tensor(counts)[:, None]
    while True:
        sizes = torch.tensor([c.numel() for c in candidates])
        padded = _pad_rows(candidates, int(sizes.max()))
        distinct = _first_occurrences(padded, torch.arange(padded.shape[1]) < sizes[:, None], width)
        rank = distinct.cumsum(1)
        found = rank[:, -1].tolist()
        short = [i for i, (have, need) in enumerate(zip(found, counts)) if have < need]
        if not short:
            break
        for i in short:
            more = samplers[i].positions(lengths[i], counts[i] - found[i] + 16)
            candidates[i] = torch.cat([candidates[i], more])
    rows, columns = (distinct & (rank <= wanted)).nonzero(as_tuple=True)
    positions = torch.zeros(len(candidates), max(max(counts), 1), dtype=torch.long)
    positions[rows, rank[rows, columns] - 1] = padded[rows, columns]
    return positions


def _pad_rows(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


# ------------------------------------------------------------------------------------ filter design


def max_taps(cfg: RawBoostConfig) -> int:
    """Taps of the longest notch cascade: ``n_bands`` odd band-stop filters convolved."""
    longest_band = cfg.max_coeff | 1  # even draws get one tap more
    return cfg.n_bands * (longest_band - 1) + 1


def design_notch_cascades(draws: NotchDraws, cfg: RawBoostConfig) -> torch.Tensor:
    """``[..., max_taps(cfg)]`` float64 FIR taps of each notch cascade, centred in the buffer.

    Each band is scipy.signal.firwin(taps, [f1, f2], window='hamming') (a band-stop scaled to unit
    DC gain); the bands are convolved; the cascade is scaled to ``gain_db`` over the peak of its
    freqz magnitude. Centring every cascade in one buffer gives all of them the same delay, so one
    FFT block plan filters the whole batch with the reference's alignment.
    """
    fs = float(cfg.sample_rate_hz)
    nyquist = fs / 2
    center = draws.center_hz.to(torch.float64)
    half_bw = draws.bandwidth_hz.to(torch.float64) / 2
    taps = draws.coeffs + (draws.coeffs % 2 == 0).long()
    low = torch.where(center - half_bw <= 0, 1e-3, center - half_bw) / nyquist
    high = torch.where(center + half_bw >= nyquist, nyquist - 1e-3, center + half_bw) / nyquist

    band_len = cfg.max_coeff | 1
    m = torch.arange(band_len, dtype=torch.float64, device=center.device) - (band_len - 1) / 2
    half = ((taps - 1) / 2).to(torch.float64)[..., None]
    low, high = low[..., None], high[..., None]
    # The band-stop's ideal response: delta(m) - (high sinc(high m) - low sinc(low m)); the offsets m
    # are whole numbers, so it is written with sin: ~2x faster than torch.sinc on a CPU here.
    pi_m = math.pi * m
    centre = m == 0
    passband = (torch.sin(pi_m * high) - torch.sin(pi_m * low)) / torch.where(centre, 1.0, pi_m)
    ideal = centre.to(m.dtype) - torch.where(centre, high - low, passband)
    hamming = 0.54 - 0.46 * torch.cos(math.pi * (m + half) / half)
    bands = torch.where(m.abs() <= half, ideal * hamming, 0.0)
    bands = bands / bands.sum(-1, keepdim=True)

    cascade_len = max_taps(cfg)
    n_fft = max(2 * _FREQZ_POINTS, 1 << (cascade_len - 1).bit_length())
    spectrum = torch.fft.rfft(bands, n=n_fft).prod(dim=-2)
    cascade = torch.fft.irfft(spectrum, n=n_fft)[..., :cascade_len]
    freqz = spectrum[..., :: n_fft // (2 * _FREQZ_POINTS)][..., :_FREQZ_POINTS]
    gain = 10.0 ** (draws.gain_db.to(torch.float64) / 20) / freqz.abs().amax(-1)
    return cascade * gain[..., None]


# -------------------------------------------------------------------------------- FFT filtering


class _OverlapSave:
    """FIR filtering of ``[..., T]`` rows by overlap-save FFT blocks.

    Output sample k is the full convolution at k + (taps + 1) / 2 for odd-length centred taps: the
    reference's ``filterFIR`` (lfilter over the zero-padded clip, cropped to the clip's length).
    Blocks a few times longer than the filter make the filters' spectra cheap (one short FFT each)
    and cost fewer operations than one FFT over the whole clip; all rows share the block size.
    """

    def __init__(self, num_taps: int, length: int):
        self.num_taps = num_taps
        self.length = length
        self.block = min(self._candidates(num_taps, length), key=self._cost)
        self.hop = self.block - num_taps + 1
        self.num_blocks = -(-length // self.hop)

    @staticmethod
    def _candidates(num_taps: int, length: int) -> list[int]:
        smallest = 1 << (2 * num_taps - 1).bit_length()
        largest = max(smallest, 1 << (length + num_taps - 2).bit_length())
        return [1 << k for k in range(smallest.bit_length() - 1, largest.bit_length())]

    def _cost(self, block: int) -> float:
        return -(-self.length // (block - self.num_taps + 1)) * block * math.log2(block)

    def spectrum(self, taps: torch.Tensor) -> torch.Tensor:
        """``[..., block // 2 + 1]`` frequency response of ``taps [..., num_taps]``."""
        return torch.fft.rfft(taps, n=self.block)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` zero-padded so that block outputs land on the reference's alignment."""
        lead = (self.num_taps - 3) // 2
        total = (self.num_blocks - 1) * self.hop + self.block
        return torch.nn.functional.pad(x, (lead, total - lead - x.shape[-1]))

    def frames(self, padded: torch.Tensor) -> torch.Tensor:
        """``[..., num_blocks, block]`` overlapping blocks of ``pad(x)``, contiguous (the FFT would
        otherwise copy the strided view on every call)."""
        return padded.unfold(-1, self.block, self.hop).contiguous()

    def blocks(self, padded: torch.Tensor) -> torch.Tensor:
        """``[..., num_blocks, block // 2 + 1]`` spectra of the overlapping blocks of ``pad(x)``."""
        return torch.fft.rfft(self.frames(padded))

    def output(self, spectra: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` signal from filtered block spectra."""
        y = torch.fft.irfft(spectra, n=self.block)[..., self.num_taps - 1:]
        return y.flatten(-2)[..., : self.length]


# ------------------------------------------------------------------------------------ algorithms


def _masked_peak_normalise_(y: torch.Tensor) -> torch.Tensor:
    """The reference's ``normWav(y, 0)``, in place: divide by the peak only when it exceeds 1
    (padding is 0)."""
    # abs().amax() is ~10x faster on a CPU than vector_norm(ord=inf) (measured, torch 2.11).
    peak = y.abs().amax(-1, keepdim=True)
    return y.div_(peak.clamp_min_(1))


def _lnl(x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, draws: NotchDraws,
         cfg: RawBoostConfig) -> torch.Tensor:
    taps = design_notch_cascades(draws, cfg).to(x.dtype)  # [B, n_f, M]
    fir = _OverlapSave(taps.shape[-1], x.shape[-1])
    responses = fir.spectrum(taps)[:, :, None, :]  # [B, n_f, 1, F]
    # Filtering is linear, so the n_f branches are summed as spectra: one inverse FFT. Powers act
    # sample-wise, so the blocks of x^j are the blocks of x to the j: x is framed once and every
    # power is a contiguous in-place product. One branch at a time keeps the working set small
    # (stacking all n_f branches into one FFT call is ~2x slower on a CPU: memory bound).
    frames = fir.frames(fir.pad(x))
    power = frames.clone()
    total = torch.fft.rfft(power).mul_(responses[:, 0])
    for j in range(1, taps.shape[1]):
        total.addcmul_(torch.fft.rfft(power.mul_(frames)), responses[:, j])
    y = fir.output(total).mul_(mask)
    mean = y.sum(-1, keepdim=True) / lengths.clamp_min(1)[:, None].to(y.dtype)
    return _masked_peak_normalise_(y.sub_(mean).mul_(mask))


def _isd(x: torch.Tensor, positions: torch.Tensor, factors: torch.Tensor, g_sd: float) -> torch.Tensor:
    impulses = g_sd * x.gather(1, positions) * factors.to(x.dtype)
    return _masked_peak_normalise_(x.scatter_add(1, positions, impulses))


def _ssi(x: torch.Tensor, mask: torch.Tensor, draws: NotchDraws, snr_db: torch.Tensor,
         noise: torch.Tensor, cfg: RawBoostConfig) -> torch.Tensor:
    # The reference's gain and peak normalisation of the coloured noise cancel in the SNR scaling.
    taps = design_notch_cascades(draws, cfg).to(x.dtype)  # [B, M]
    fir = _OverlapSave(taps.shape[-1], x.shape[-1])
    noise = fir.pad(noise.to(x.dtype))  # the noise is max(lengths) wide, x may be wider
    coloured = fir.output(fir.blocks(noise).mul_(fir.spectrum(taps)[:, None, :])).mul_(mask)
    scale = x.norm(dim=-1) / coloured.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
    scale = scale / 10.0 ** (snr_db.to(x.dtype) / 20)
    return torch.addcmul(x, coloured, scale[:, None])


# ------------------------------------------------------------------------------------------- public


class RawBoost:
    """Batched RawBoost: ``draw`` the per-sample random parameters, ``apply`` them to a batch.

    ``algo`` overrides ``cfg.algo`` (dual-path training uses ``DualPathConfig.rawboost_algo``).
    """

    def __init__(self, cfg: RawBoostConfig, algo: int | None = None):
        cfg.validate()
        self.cfg = cfg
        self.algo = cfg.algo if algo is None else algo
        if self.algo not in range(9):
            raise ValueError(f"rawboost algo must be in 0..8, got {self.algo!r}")

    def draw(self, ids: Sequence[str], lengths: torch.Tensor, epoch: int,
             repeats: Sequence[int] | None = None) -> RawBoostParams:
        """Draws for every sample (on the CPU, so every device sees the same numbers); ``repeats``
        (default all 0) tells the reads of one id within the epoch apart."""
        lengths = [int(n) for n in lengths.tolist()]
        repeats = list(repeats) if repeats else [0] * len(ids)
        if not len(ids) == len(lengths) == len(repeats):
            raise ValueError(f"rawboost: {len(ids)} ids, {len(lengths)} lengths and {len(repeats)} repeats")
        cfg = self.cfg
        samplers = [_SampleSampler(sample_seed(cfg.seed, sid, epoch, repeat)) for sid, repeat in zip(ids, repeats)]
        ranges = []
        if self.algo in USES_LNL:
            ranges += _notch_ranges(cfg, cfg.n_f)
        if self.algo in USES_ISD:
            ranges += [(0.0, cfg.p_percent, 1)]
        if self.algo in USES_SSI:
            ranges += _notch_ranges(cfg, 1) + [(cfg.snr_min_db, cfg.snr_max_db, 1)]
        sizes = [size for _, _, size in ranges]
        low = torch.cat([torch.full((size,), float(lo), dtype=torch.float64) for lo, _, size in ranges])
        high = torch.cat([torch.full((size,), float(hi), dtype=torch.float64) for _, hi, size in ranges])
        uniforms = torch.empty(len(ids), sum(sizes), dtype=torch.float64)
        for sampler, row in zip(samplers, uniforms):
            sampler.uniforms(row)
        parts = list(torch.split(low + (high - low) * uniforms, sizes, dim=1))

        params = RawBoostParams()
        if self.algo in USES_LNL:
            params.lnl = _notches(parts[:5], cfg, cfg.n_f)
            parts = parts[5:]
        if self.algo in USES_ISD:
            beta_percent = parts.pop(0)[:, 0].tolist()
            counts = [int(n * (beta / 100.0)) for n, beta in zip(lengths, beta_percent)]
            candidates, factors = zip(*(s.impulses(n, c) for s, n, c in zip(samplers, lengths, counts)))
            params.isd_positions = _distinct_positions(samplers, list(candidates), lengths, counts)
            params.isd_factors = _pad_rows(factors, params.isd_positions.shape[1])
        if self.algo in USES_SSI:
            params.ssi = NotchDraws(*(t[:, 0] for t in dataclasses.astuple(_notches(parts[:5], cfg, 1))))
            params.ssi_snr_db = parts[5][:, 0]
            params.ssi_noise = torch.zeros(len(ids), max(lengths, default=0))
            for sampler, row, n in zip(samplers, params.ssi_noise, lengths):
                sampler.noise(row[:n])
        return params

    def apply(self, waveforms: torch.Tensor, lengths: torch.Tensor, params: RawBoostParams) -> torch.Tensor:
        """Augment ``waveforms [B, T]`` (valid up to ``lengths``) with drawn ``params``.

        Computes in float32 (float64 if given float64) on the waveforms' device; padding stays zero.
        """
        if waveforms.ndim != 2 or lengths.shape != waveforms.shape[:1]:
            raise ValueError(f"rawboost: expected waveforms [B, T] and lengths [B], got "
                             f"{tuple(waveforms.shape)} and {tuple(lengths.shape)}")
        if self.algo == 0 or waveforms.shape[0] == 0:
            return waveforms
        device = waveforms.device
        params = params.to(device)
        lengths = lengths.to(device)
        dtype = torch.float64 if waveforms.dtype == torch.float64 else torch.float32
        # A 0/1 mask in the compute dtype: multiplying by a bool mask would convert it every time.
        mask = (torch.arange(waveforms.shape[1], device=device)[None, :] < lengths[:, None]).to(dtype)
        x = waveforms.to(dtype) * mask
        cfg = self.cfg

        def lnl(signal):
            return _lnl(signal, mask, lengths, params.lnl, cfg)

        def isd(signal):
            return _isd(signal, params.isd_positions, params.isd_factors, cfg.g_sd)

        def ssi(signal):
            return _ssi(signal, mask, params.ssi, params.ssi_snr_db, params.ssi_noise, cfg)

        chains = {1: [lnl], 2: [isd], 3: [ssi], 4: [lnl, isd, ssi], 5: [lnl, isd], 6: [lnl, ssi],
                  7: [isd, ssi]}
        if self.algo == 8:
            y = _masked_peak_normalise_(lnl(x) + isd(x))
        else:
            y = x
            for stage in chains[self.algo]:
                y = stage(y)
        return y.to(waveforms.dtype)

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        """A new batch with augmented waveforms (same lengths, labels, ids, meta)."""
        if self.algo == 0 or batch.is_empty:
            return batch
        params = self.draw(batch.ids, batch.lengths, epoch, batch.repeats)
        waveforms = self.apply(batch.waveforms, batch.lengths, params)
        return dataclasses.replace(batch, waveforms=waveforms)
