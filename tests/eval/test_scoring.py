"""Long-audio scoring: window layout, windowed scores vs windows scored one by one, batching
invariance, an hour-long file with a bounded number of windows held, score definitions."""

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.config import ModelConfig
from posttrain.eval.calibration import Calibration
from posttrain.eval.inference import FileSource, Sample, WindowMeter, decoded_inputs, iter_outputs
from posttrain.eval.scoring import InferenceConfig
from posttrain.eval.metrics import bayes_threshold
from posttrain.eval.scoring import Decision, WindowConfig, calibration_from_identity, logit_diff, p_real
from posttrain.models.detector import build_detector
from posttrain.models.presets import get_preset

RATE = 16000


@pytest.fixture(scope="module")
def model():
    """A tiny detector with a cheap feature extractor (640 samples per frame) so minutes of audio
    run in seconds on a CPU core."""
    torch.manual_seed(0)
    ssl = {**get_preset("tiny").ssl_config().to_dict(), "conv_dim": [8, 8, 8], "conv_stride": [10, 8, 8],
           "conv_kernel": [10, 8, 8]}
    return build_detector(ModelConfig(preset="tiny"), ssl_config=ssl).eval()


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(0.3 * t))  # slow level changes across windows
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def _reference_logits(model, wave: np.ndarray) -> np.ndarray:
    """One window alone: its own zero-mean/unit-variance normalisation, no padding, fp64 result."""
    x = torch.from_numpy(wave.astype(np.float64))
    x = ((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)).float()[None]
    with torch.no_grad():
        return model(x, torch.tensor([x.shape[1]])).double().numpy()[0]


def _reference_file(model, wave: np.ndarray, window_s: float, rule: str) -> np.ndarray:
    """The documented rule, written out: 13 s windows from 0; a tail < 1 s joins the previous window;
    mean of logits weighted by window length, or the window with the lowest logit_diff."""
    w = int(window_s * RATE)
    bounds = list(range(0, len(wave), w)) + [len(wave)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < RATE:
        del bounds[-2]
    windows = [wave[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    logits = np.stack([_reference_logits(model, win) for win in windows])
    if rule == "max_fake":
        return logits[np.argmin(logits[:, 1] - logits[:, 0])]
    lengths = np.array([len(win) for win in windows], dtype=np.float64)
    return (lengths[:, None] * logits).sum(0) / lengths.sum()


def test_window_spans_tile_the_file_and_merge_a_short_tail():
    cfg = WindowConfig(window_seconds=13, hop_seconds=13, min_tail_seconds=1)
    assert cfg.spans(40 * RATE) == [(0, 13 * RATE), (13 * RATE, 26 * RATE), (26 * RATE, 39 * RATE),
                                    (39 * RATE, 40 * RATE)]
    # 0.5 s left after 26 s: merged into the second window, which runs to the end
    assert cfg.spans(int(26.5 * RATE)) == [(0, 13 * RATE), (13 * RATE, int(26.5 * RATE))]
    assert cfg.spans(int(13.9 * RATE)) == [(0, int(13.9 * RATE))]  # one window up to window + min_tail
    assert cfg.spans(5 * RATE) == [(0, 5 * RATE)]
    overlap = WindowConfig(window_seconds=4, hop_seconds=2, min_tail_seconds=0).spans(9 * RATE)
    assert overlap == [(0, 4 * RATE), (2 * RATE, 6 * RATE), (4 * RATE, 8 * RATE), (6 * RATE, 9 * RATE)]
    assert WindowConfig(window_seconds=0).spans(123456) == [(0, 123456)]
    with pytest.raises(ValueError, match="hop_seconds"):
        WindowConfig(window_seconds=4, hop_seconds=5).validate()


@pytest.mark.parametrize("rule", ["mean_logits", "max_fake"])
def test_windowed_scores_equal_windows_scored_one_by_one(model, rule):
    waves = [_noise(40.5, 1), _noise(26.4, 2), _noise(3.2, 3)]  # 4 windows; 2 (tail merged); 1
    cfg = InferenceConfig(window=WindowConfig(13, 13, 1), aggregation=rule, batch_seconds=60, max_batch_size=8)
    samples = [Sample(i, f"f{i}", w, {}) for i, w in enumerate(waves)]
    outputs = {o.position: o for o in iter_outputs(model, samples, cfg)}
    assert [outputs[i].num_windows for i in range(3)] == [4, 2, 1]
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(outputs[i].logits, _reference_file(model, wave, 13, rule), atol=1e-5, rtol=0)


def test_batching_across_files_does_not_change_scores(model):
    waves = [_noise(s, 10 + i) for i, s in enumerate((0.7, 2.9, 14.2, 1.3, 27.0, 0.45))]
    samples = [Sample(i, f"f{i}", w, {}) for i, w in enumerate(waves)]
    window = WindowConfig(13, 13, 1)
    together = iter_outputs(model, samples, InferenceConfig(window=window, batch_seconds=200, max_batch_size=64),
                            embeddings=True)
    alone = iter_outputs(model, samples, InferenceConfig(window=window, batch_seconds=1, max_batch_size=1),
                         embeddings=True)
    together, alone = sorted(together, key=lambda o: o.position), sorted(alone, key=lambda o: o.position)
    assert [o.id for o in together] == [o.id for o in alone] == [f"f{i}" for i in range(6)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_hour_long_file_scores_with_bounded_windows_in_flight(model, tmp_path):
    path = tmp_path / "hour.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=RATE, channels=1, subtype="PCM_16") as handle:
        for _ in range(60):  # one minute at a time: the test never holds the hour as float64
            handle.write((0.1 * rng.standard_normal(60 * RATE)).astype(np.float32))
    source = FileSource([tmp_path])
    cfg = InferenceConfig(window=WindowConfig(13, 13, 1), batch_seconds=26, max_batch_size=2, num_buckets=2)
    meter = WindowMeter()
    tasks = source.tasks()
    outputs = list(iter_outputs(model, decoded_inputs(source, tasks, 0), cfg, meter=meter))
    assert len(outputs) == 1 and outputs[0].num_samples == 3600 * RATE
    assert outputs[0].num_windows == meter.total == 277  # 276 x 13 s + 12 s
    assert meter.live == 0 and meter.peak <= cfg.max_windows_held == 6
    assert np.isfinite(outputs[0].logits).all()


def test_score_definitions_and_decisions():
    logits = np.array([[0.3, 1.5], [2.0, -1.0]])
    np.testing.assert_allclose(logit_diff(logits), [1.2, -3.0])
    np.testing.assert_allclose(p_real(logits), torch.softmax(torch.tensor(logits), dim=1)[:, 1].numpy(), rtol=1e-12)
    assert p_real(np.array([0.0, 800.0])) == 1.0  # no overflow warning path
    assert Decision.of(None).label(0.0) == "real" and Decision.of(None).label(-1e-9) == "fake"
    calibration = Calibration(slope=2.0, offset=-1.0)
    decision = Decision.of(calibration)
    assert calibration.llr([decision.threshold])[0] == pytest.approx(bayes_threshold())
    assert decision.label(decision.threshold + 1e-6) == "real" and decision.label(decision.threshold - 1e-6) == "fake"
    stored = calibration_from_identity({"calibration": {**calibration.to_dict(), "score_threshold": 0.1}})
    assert (stored.slope, stored.offset) == (2.0, -1.0)
    assert calibration_from_identity({"calibration": None}) is None
