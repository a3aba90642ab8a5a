"""Batched torch RawBoost against a per-clip numpy/scipy reference fed the same random draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import signal

from posttrain.augment.rawboost import RawBoost, RawBoostParams
from posttrain.config import RawBoostConfig
from posttrain.data.batch import Batch

FS = 16000


# ------------------------------------------------- independent per-clip reference (scipy, float64)


def ref_notch(fc, bw, coeffs, gain_db, cfg):
    """The reference genNotchCoeffs with its random numbers given."""
    b = np.ones(1)
    for f, w, c in zip(fc, bw, coeffs):
        c = int(c)
        if c % 2 == 0:
            c += 1
        f1, f2 = f - w / 2, f + w / 2
        if f1 <= 0:
            f1 = 1 / 1000
        if f2 >= FS / 2:
            f2 = FS / 2 - 1 / 1000
        b = np.convolve(signal.firwin(c, [f1, f2], window="hamming", fs=FS), b)
    _, h = signal.freqz(b, 1, fs=FS)
    return 10 ** (gain_db / 20) * b / np.amax(np.abs(h))


def ref_filter(x, b):
    n = b.shape[0] + 1
    y = signal.lfilter(b, 1, np.pad(x, (0, n)))
    return y[n // 2: y.shape[0] - n // 2]


def ref_norm(x, always):
    peak = np.amax(np.abs(x))
    return x / peak if always or peak > 1 else x


def ref_lnl(x, draws, row, cfg):
    y = np.zeros_like(x)
    for j in range(cfg.n_f):
        b = ref_notch(*(np.asarray(t[row, j]) for t in (draws.center_hz, draws.bandwidth_hz, draws.coeffs)),
                      float(draws.gain_db[row, j]), cfg)
        y = y + ref_filter(np.power(x, j + 1), b)
    return ref_norm(y - np.mean(y), False)


def ref_isd(x, positions, factors, cfg):
    y = x.copy()
    y[positions] = x[positions] + cfg.g_sd * x[positions] * factors
    return ref_norm(y, False)


def ref_ssi(x, params, row, cfg):
    noise = params.ssi_noise[row, : x.shape[0]].double().numpy()
    d = params.ssi
    b = ref_notch(d.center_hz[row].numpy(), d.bandwidth_hz[row].numpy(), d.coeffs[row].numpy(),
                  float(d.gain_db[row]), cfg)
    noise = ref_norm(ref_filter(noise, b), True)
    snr = float(params.ssi_snr_db[row])
    return x + noise / np.linalg.norm(noise, 2) * np.linalg.norm(x, 2) / 10.0 ** (0.05 * snr)


def ref_rawboost(x, algo, params: RawBoostParams, row, cfg):
    count = int((params.isd_factors[row] != 0).sum()) if params.isd_factors is not None else 0

    def isd(v):
        return ref_isd(v, params.isd_positions[row, :count].numpy(),
                       params.isd_factors[row, :count].numpy(), cfg)

    def lnl(v):
        return ref_lnl(v, params.lnl, row, cfg)

    def ssi(v):
        return ref_ssi(v, params, row, cfg)

    if algo == 8:
        return ref_norm(lnl(x) + isd(x), False)
    stages = {1: [lnl], 2: [isd], 3: [ssi], 4: [lnl, isd, ssi], 5: [lnl, isd], 6: [lnl, ssi], 7: [isd, ssi]}
    for stage in stages[algo]:
        x = stage(x)
    return x


# --------------------------------------------------------------------------------------- fixtures


def speechlike(lengths, seed=0, width=None):
    """Zero-padded clips in [-1, 1]: a few harmonics plus coloured noise, per clip."""
    rng = np.random.default_rng(seed)
    width = width or max(lengths)
    out = np.zeros((len(lengths), width), dtype=np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / FS
        wave = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate(rng.uniform(100, 3000, 4), 1))
        wave = wave + signal.lfilter([1.0], [1.0, -0.9], rng.normal(0, 0.1, n))
        out[i, :n] = 0.9 * wave / np.abs(wave).max()
    return torch.from_numpy(out)


def make_batch(lengths, seed=0, width=None):
    waves = speechlike(lengths, seed, width)
    n = len(lengths)
    return Batch(waves, torch.tensor(lengths), torch.zeros(n, dtype=torch.long),
                 [f"corpus-{seed}-{i}" for i in range(n)], [{} for _ in range(n)])


LENGTHS = [4000, 2500, 3001, 1200]


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("algo", range(1, 9))
def test_matches_scipy_reference_per_clip(algo):
    cfg = RawBoostConfig()
    batch = make_batch(LENGTHS, seed=algo, width=4200)  # extra padding beyond the longest clip
    rb = RawBoost(cfg, algo=algo)
    params = rb.draw(batch.ids, batch.lengths, epoch=3)
    out = rb.apply(batch.waveforms, batch.lengths, params)
    assert out.dtype == torch.float32 and out.shape == batch.waveforms.shape
    for row, n in enumerate(LENGTHS):
        x = batch.waveforms[row, :n].double().numpy()
        expected = ref_rawboost(x, algo, params, row, cfg)
        scale = max(1.0, np.abs(expected).max())
        np.testing.assert_allclose(out[row, :n].double().numpy(), expected, atol=1e-5 * scale, rtol=0)
        assert torch.all(out[row, n:] == 0), "padding must stay zero"
    assert not torch.allclose(out, batch.waveforms)


def test_row_does_not_depend_on_batch_padding_or_neighbours():
    cfg = RawBoostConfig()
    rb = RawBoost(cfg, algo=4)
    batch = make_batch([3000, 1800], seed=11, width=3500)
    params = rb.draw(batch.ids, batch.lengths, epoch=0)
    together = rb.apply(batch.waveforms, batch.lengths, params)
    alone_params = rb.draw(batch.ids[1:], batch.lengths[1:], epoch=0)
    alone = rb.apply(batch.waveforms[1:, :1800], batch.lengths[1:], alone_params)
    torch.testing.assert_close(together[1, :1800], alone[0], atol=2e-6, rtol=0)


def test_same_seed_and_id_reproduce_and_others_differ():
    cfg = RawBoostConfig(seed=7)
    rb = RawBoost(cfg, algo=4)
    batch = make_batch([2000, 2000], seed=1)
    first = rb(batch, epoch=2).waveforms
    again = RawBoost(RawBoostConfig(seed=7), algo=4)(batch, epoch=2).waveforms
    assert torch.equal(first, again)
    # Same audio under another id, epoch or seed gets another augmentation.
    twin = Batch(batch.waveforms, batch.lengths, batch.labels, ["other-id", batch.ids[1]], batch.meta)
    assert not torch.allclose(rb(twin, epoch=2).waveforms[0], first[0])
    assert torch.equal(rb(twin, epoch=2).waveforms[1], first[1])
    assert not torch.allclose(rb(batch, epoch=3).waveforms, first)
    assert not torch.allclose(RawBoost(RawBoostConfig(seed=8), algo=4)(batch, epoch=2).waveforms, first)
    # Rows are augmented by id, whatever their position in the batch.
    flipped = Batch(batch.waveforms.flip(0), batch.lengths, batch.labels, batch.ids[::-1], batch.meta)
    torch.testing.assert_close(rb(flipped, epoch=2).waveforms.flip(0), first, atol=1e-6, rtol=0)


def test_draws_stay_in_reference_ranges():
    cfg = RawBoostConfig()
    rb = RawBoost(cfg, algo=4)
    n, length = 400, 1000
    params = rb.draw([f"s{i}" for i in range(n)], torch.full((n,), length), epoch=0)
    lnl = params.lnl

    def check_uniform(values, low, high):
        values = values.flatten().double()
        assert values.min() >= low and values.max() <= high
        span = high - low
        assert values.min() < low + 0.02 * span and values.max() > high - 0.02 * span
        counts = torch.histc(values, bins=5, min=low, max=high)
        assert counts.min() > 0.7 * values.numel() / 5, counts

    check_uniform(lnl.center_hz, cfg.min_f_hz, cfg.max_f_hz)
    check_uniform(lnl.bandwidth_hz, cfg.min_bw_hz, cfg.max_bw_hz)
    check_uniform(lnl.coeffs, cfg.min_coeff, cfg.max_coeff - 1)
    assert lnl.coeffs.dtype == torch.int64
    assert torch.all(lnl.gain_db[:, 0] == 0)  # minG = maxG = 0 for the linear term
    check_uniform(lnl.gain_db[:, 1:], cfg.max_g_db - cfg.max_bias_db, cfg.min_g_db - cfg.min_bias_db)
    check_uniform(params.ssi.center_hz, cfg.min_f_hz, cfg.max_f_hz)
    check_uniform(params.ssi_snr_db, cfg.snr_min_db, cfg.snr_max_db)

    counts = (params.isd_factors != 0).sum(1)
    assert counts.max() <= length * cfg.p_percent / 100
    check_uniform(counts.double() / length * 100, 0, cfg.p_percent)
    for row in range(20):
        positions = params.isd_positions[row, : counts[row]]
        assert positions.unique().numel() == positions.numel() and positions.max() < length
    factors = params.isd_factors[params.isd_factors != 0]
    assert factors.abs().max() <= 1 and abs(float(factors.mean())) < 0.02
    noise = params.ssi_noise
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01


def test_gain_bias_applies_to_every_nonlinear_order():
    cfg = RawBoostConfig(min_g_db=-2.0, max_g_db=2.0, min_bias_db=5.0, max_bias_db=7.0, n_f=4)
    params = RawBoost(cfg, algo=1).draw([f"s{i}" for i in range(300)], torch.full((300,), 100), epoch=0)
    gains = params.lnl.gain_db
    assert gains[:, 0].min() >= -2 and gains[:, 0].max() <= 2 and gains[:, 0].min() < -1.5
    assert gains[:, 1:].min() >= -7 and gains[:, 1:].max() <= -5  # U[-2 - 5, 2 - 7]


def test_isd_factor_is_a_product_of_two_uniforms():
    """(2U-1)(2U-1): mean 0, variance E[(2U-1)^2]^2 = 1/9 (a single 2U-1 would give 1/3), and the
    distribution P(|f| <= t) = t (1 - ln t) of a product of two U[-1, 1]."""
    cfg = RawBoostConfig(p_percent=10.0)
    params = RawBoost(cfg, algo=2).draw([f"s{i}" for i in range(200)], torch.full((200,), 2000), epoch=0)
    factors = params.isd_factors[params.isd_factors != 0].double()
    assert factors.numel() > 15000
    assert float(factors.var()) == pytest.approx(1 / 9, rel=0.05)
    for t in (0.1, 0.3, 0.6):
        assert float((factors.abs() <= t).double().mean()) == pytest.approx(t * (1 - np.log(t)), abs=0.015)


def test_repeats_of_one_read_differ_and_a_read_reproduces():
    """A file read twice in one epoch (set weight >= 2) gets different noise per repeat; the same
    read (seed, id, epoch, repeat) reproduces, whatever the batch."""
    rb = RawBoost(RawBoostConfig(seed=7), algo=5)
    clip = make_batch([3000], seed=2)
    twice = Batch(clip.waveforms.repeat(2, 1), clip.lengths.repeat(2), clip.labels.repeat(2),
                  clip.ids * 2, clip.meta * 2, repeats=[0, 1])
    out = rb(twice, epoch=1).waveforms
    assert (out[0] - out[1]).abs().max() > 1e-2
    assert torch.equal(rb(clip, epoch=1).waveforms[0], out[0])  # no repeats given = the first read
    again = Batch(clip.waveforms, clip.lengths, clip.labels, clip.ids, clip.meta, repeats=[1])
    torch.testing.assert_close(rb(again, epoch=1).waveforms[0], out[1], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="repeats"):
        rb.draw(clip.ids, clip.lengths, epoch=1, repeats=[0, 1])


def test_algo_zero_and_join_batch_pass_through():
    batch = make_batch([500, 300])
    assert RawBoost(RawBoostConfig(), algo=0)(batch, epoch=0) is batch
    empty = Batch.empty()
    assert RawBoost(RawBoostConfig(), algo=4)(empty, epoch=0) is empty


def test_bad_algo_raises():
    with pytest.raises(ValueError, match="algo"):
        RawBoost(RawBoostConfig(), algo=9)
