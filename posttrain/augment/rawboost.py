"""RawBoost (Tak et al., ICASSP 2022), batched in torch and seeded per sample.

Algorithms (``RawBoostConfig.algo``): 0 none, 1 LnL (linear and non-linear convolutive noise),
2 ISD (impulsive signal-dependent noise), 3 SSI (stationary signal-independent noise),
4 = 1->2->3, 5 = 1->2, 6 = 1->3, 7 = 2->3, 8 = peak-normalise(LnL(x) + ISD(x)).

The random draws (``RawBoostParams``) are separate from the signal processing (``RawBoost.apply``):
each sample's draws come from its own generator seeded by a stable hash of ``seed:sample_id:epoch``,
so a resumed run, both passes of a SAM step and every rank see the same augmentation of a sample,
whatever the batch it lands in. The processing runs on the whole padded batch at once on any
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


def sample_seed(seed: int, sample_id: str, epoch: int) -> int:
    """A 64-bit seed that is the same in every process (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{sample_id}:{epoch}".encode(), digest_size=8).digest()
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


class _SampleSampler:
    """One sample's draws, in a fixed order (LnL, ISD, SSI) from its own generator."""

    def __init__(self, cfg: RawBoostConfig, seed: int):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def notches(self, num_cascades: int) -> NotchDraws:
        cfg = self.cfg
        shape = (num_cascades, cfg.n_bands)
        return NotchDraws(
            center_hz=self.uniform(cfg.min_f_hz, cfg.max_f_hz, *shape),
            bandwidth_hz=self.uniform(cfg.min_bw_hz, cfg.max_bw_hz, *shape),
            coeffs=self.uniform(cfg.min_coeff, cfg.max_coeff, *shape).long(),
            gain_db=self.gain_db(num_cascades),
        )

    def gain_db(self, num_cascades: int) -> torch.Tensor:
        # The non-linear terms (j >= 2) are attenuated: U[minG - minBias, maxG - maxBias] dB.
        cfg = self.cfg
        linear = self.uniform(cfg.min_g_db, cfg.max_g_db, 1)
        nonlinear = self.uniform(cfg.min_g_db - cfg.min_bias_db, cfg.max_g_db - cfg.max_bias_db, num_cascades - 1)
        return torch.cat([linear, nonlinear])

    def impulses(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        beta_percent = float(self.uniform(0.0, self.cfg.p_percent, 1))
        count = int(length * (beta_percent / 100.0))
        positions = self.distinct_positions(length, count)
        first, second = (2 * torch.rand(2, count, generator=self.generator, dtype=torch.float64) - 1)
        return positions, first * second

    def distinct_positions(self, length: int, count: int) -> torch.Tensor:
        """``count`` distinct positions in ``[0, length)``, a uniformly random subset like the
        reference's ``permutation(length)[:count]``: the first distinct values of i.i.d. uniform draws,
        which costs O(count) random numbers instead of a full O(length) permutation."""
        draws = torch.empty(0, dtype=torch.long)
        picked = draws
        while picked.numel() < count:
            # Expected repeats among m draws are ~m^2 / (2 length); draw a margin above that.
            extra = count - picked.numel() + 2 * count * count // max(length, 1) + 16
            draws = torch.cat([draws, torch.randint(length, (extra,), generator=self.generator)])
            first = torch.full((length,), draws.numel()).scatter_reduce_(
                0, draws, torch.arange(draws.numel()), "amin")
            picked = draws[first[draws] == torch.arange(draws.numel())]
        return picked[:count]

    def noise(self, length: int) -> torch.Tensor:
        return torch.randn(length, generator=self.generator)


def _stack_notches(draws: Sequence[NotchDraws]) -> NotchDraws:
    return NotchDraws(*(torch.stack(parts) for parts in zip(*(dataclasses.astuple(d) for d in draws))))


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
    ideal = torch.sinc(m) - high * torch.sinc(high * m) + low * torch.sinc(low * m)
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

    def blocks(self, padded: torch.Tensor) -> torch.Tensor:
        """``[..., num_blocks, block // 2 + 1]`` spectra of the overlapping blocks of ``pad(x)``."""
        return torch.fft.rfft(padded.unfold(-1, self.block, self.hop))

    def output(self, spectra: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` signal from filtered block spectra."""
        y = torch.fft.irfft(spectra, n=self.block)[..., self.num_taps - 1:]
        return y.flatten(-2)[..., : self.length]


# ------------------------------------------------------------------------------------ algorithms


def _masked_peak_normalise(y: torch.Tensor) -> torch.Tensor:
    """The reference's ``normWav(y, 0)``: divide by the peak only when it exceeds 1 (padding is 0)."""
    peak = y.abs().amax(-1, keepdim=True)
    return y / torch.where(peak > 1, peak, torch.ones_like(peak))


def _lnl(x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, draws: NotchDraws,
         cfg: RawBoostConfig) -> torch.Tensor:
    taps = design_notch_cascades(draws, cfg).to(x.dtype)  # [B, n_f, M]
    fir = _OverlapSave(taps.shape[-1], x.shape[-1])
    responses = fir.spectrum(taps)[:, :, None, :]  # [B, n_f, 1, F]
    # Filtering is linear, so the n_f branches are summed as spectra: one inverse FFT. The padding
    # stays zero under powers, so x is padded once; one branch at a time keeps the working set small.
    padded = fir.pad(x)
    power = padded
    total = fir.blocks(power).mul_(responses[:, 0])
    for j in range(1, taps.shape[1]):
        power = power * padded
        total.add_(fir.blocks(power).mul_(responses[:, j]))
    y = fir.output(total) * mask
    y = (y - y.sum(-1, keepdim=True) / lengths.clamp_min(1)[:, None].to(y.dtype)) * mask
    return _masked_peak_normalise(y)


def _isd(x: torch.Tensor, positions: torch.Tensor, factors: torch.Tensor, g_sd: float) -> torch.Tensor:
    impulses = g_sd * x.gather(1, positions) * factors.to(x.dtype)
    return _masked_peak_normalise(x.scatter_add(1, positions, impulses))


def _ssi(x: torch.Tensor, mask: torch.Tensor, draws: NotchDraws, snr_db: torch.Tensor,
         noise: torch.Tensor, cfg: RawBoostConfig) -> torch.Tensor:
    # The reference's gain and peak normalisation of the coloured noise cancel in the SNR scaling.
    taps = design_notch_cascades(draws, cfg).to(x.dtype)  # [B, M]
    fir = _OverlapSave(taps.shape[-1], x.shape[-1])
    noise = torch.nn.functional.pad(noise.to(x.dtype), (0, x.shape[-1] - noise.shape[-1]))
    coloured = fir.output(fir.blocks(fir.pad(noise)).mul_(fir.spectrum(taps)[:, None, :])) * mask
    scale = x.norm(dim=-1) / coloured.norm(dim=-1).clamp_min(torch.finfo(x.dtype).tiny)
    scale = scale / 10.0 ** (snr_db.to(x.dtype) / 20)
    return x + coloured * scale[:, None]


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

    def draw(self, ids: Sequence[str], lengths: torch.Tensor, epoch: int) -> RawBoostParams:
        """Draws for every sample (on the CPU, so every device sees the same numbers)."""
        lengths = [int(n) for n in lengths.tolist()]
        if len(ids) != len(lengths):
            raise ValueError(f"rawboost: {len(ids)} ids for {len(lengths)} lengths")
        samplers = [_SampleSampler(self.cfg, sample_seed(self.cfg.seed, sid, epoch)) for sid in ids]
        params = RawBoostParams()
        if self.algo in USES_LNL:
            params.lnl = _stack_notches([s.notches(self.cfg.n_f) for s in samplers])
        if self.algo in USES_ISD:
            impulses = [s.impulses(n) for s, n in zip(samplers, lengths)]
            width = max(max(p.numel() for p, _ in impulses), 1)
            params.isd_positions = _pad_rows([p for p, _ in impulses], width)
            params.isd_factors = _pad_rows([f for _, f in impulses], width)
        if self.algo in USES_SSI:
            params.ssi = _stack_notches([s.notches(1) for s in samplers])
            params.ssi = NotchDraws(*(t[:, 0] for t in dataclasses.astuple(params.ssi)))
            params.ssi_snr_db = torch.cat([s.uniform(self.cfg.snr_min_db, self.cfg.snr_max_db, 1)
                                           for s in samplers])
            params.ssi_noise = _pad_rows([s.noise(n) for s, n in zip(samplers, lengths)],
                                         max(lengths, default=0))
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
        mask = torch.arange(waveforms.shape[1], device=device)[None, :] < lengths[:, None]
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
            y = _masked_peak_normalise(lnl(x) + isd(x))
        else:
            y = x
            for stage in chains[self.algo]:
                y = stage(y)
        return y.to(waveforms.dtype)

    def __call__(self, batch: Batch, epoch: int) -> Batch:
        """A new batch with augmented waveforms (same lengths, labels, ids, meta)."""
        if self.algo == 0 or batch.is_empty:
            return batch
        params = self.draw(batch.ids, batch.lengths, epoch)
        waveforms = self.apply(batch.waveforms, batch.lengths, params)
        return dataclasses.replace(batch, waveforms=waveforms)
