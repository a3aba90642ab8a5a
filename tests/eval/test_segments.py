"""PartialSpoof segment trials and localisation, against references written here sample by sample."""

from types import SimpleNamespace

import numpy as np
import pytest

from posttrain.eval.metrics import compute_metrics
from posttrain.eval.report import format_table, evaluate, ScoreTable
from posttrain.eval.segments import (evaluate_segments, localise, segment_grid, segment_labels, segment_scores,
                                     supported_resolutions)

RATE = 16_000


def reference_labels(num_samples, resolution, regions):
    """1 = real / 0 = fake per segment: fake when any of its samples lies in a region."""
    spoofed = set()
    for start, stop in regions:
        spoofed.update(range(start, stop))
    labels = []
    for start in range(0, num_samples, resolution):
        samples = range(start, min(start + resolution, num_samples))
        labels.append(0 if any(sample in spoofed for sample in samples) else 1)
    return labels


def reference_scores(num_samples, resolution, windows, scores):
    out = []
    for start in range(0, num_samples, resolution):
        stop = min(start + resolution, num_samples)
        weights = [max(0, min(stop, w_stop) - max(start, w_start)) for w_start, w_stop in windows]
        out.append(sum(w * s for w, s in zip(weights, scores)) / sum(weights))
    return out


def reference_eer(bona, spoof):
    """Threshold sweep: reject below t; the EER where FRR and FAR are closest (no ties in these data)."""
    best = None
    for t in [-np.inf, *sorted(np.concatenate([bona, spoof]))]:
        frr, far = np.mean(bona < t), np.mean(spoof >= t)
        if best is None or abs(frr - far) < best[0]:
            best = (abs(frr - far), (frr + far) / 2)
    return best[1]


def output(file_id, num_samples, windows, scores):
    """A SampleOutput-like record: window logits [fake, real] whose difference is ``scores``."""
    scores = np.asarray(scores, dtype=np.float64)
    return SimpleNamespace(id=file_id, num_samples=num_samples, window_spans=tuple(windows), meta={},
                           window_logits=np.stack([np.zeros_like(scores), scores], axis=1))


def test_labels_follow_the_overlap_rule_at_boundaries():
    resolution = 320  # 20 ms
    # a region exactly on segment 1: its neighbours only touch it and stay real
    assert segment_labels(segment_grid(1600, resolution), [(320, 640)]).tolist() == [1, 0, 1, 1, 1]
    # one sample into a segment makes it fake; the truncated last segment is a trial too
    assert segment_labels(segment_grid(1700, resolution), [(639, 641), (1699, 1700)]).tolist() == [1, 0, 0, 1, 1, 0]
    rng = np.random.default_rng(0)
    for _ in range(30):
        num_samples = int(rng.integers(2000, 9000))
        edges = np.sort(rng.choice(np.arange(1, num_samples), size=4, replace=False))
        regions = [(int(edges[0]), int(edges[1])), (int(edges[2]), int(edges[3]))]
        for resolution in (320, 640, 1280):
            assert segment_labels(segment_grid(num_samples, resolution), regions).tolist() == \
                reference_labels(num_samples, resolution, regions)


def test_segment_scores_are_the_overlap_weighted_window_mean():
    rng = np.random.default_rng(1)
    num_samples = 7777
    windows = [(start, min(start + 800, num_samples)) for start in range(0, num_samples - 800 + 1, 160)]
    windows[-1] = (windows[-1][0], num_samples)  # the merged tail window
    scores = rng.normal(size=len(windows))
    for resolution in (320, 1280, 10240):
        np.testing.assert_allclose(segment_scores(segment_grid(num_samples, resolution), windows, scores),
                                   reference_scores(num_samples, resolution, windows, scores), rtol=1e-12)


def test_resolutions_are_those_no_finer_than_the_hop():
    assert supported_resolutions(0.1) == (0.16, 0.32, 0.64)
    assert supported_resolutions(0.02) == (0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
    with pytest.raises(ValueError, match="--hop-seconds 1 .*0.64"):
        supported_resolutions(1.0)


def test_segment_eer_on_constructed_scores_matches_the_reference():
    rng = np.random.default_rng(2)
    hop = 320  # 20 ms windows, no overlap: at 20 ms each segment's score is its window's
    outputs, regions, lengths = [], {}, {}
    for index in range(12):
        num_samples = int(rng.integers(30, 60)) * hop + int(rng.integers(0, hop))
        start = int(rng.integers(hop, num_samples // 2))
        regions[f"f{index}"] = [(start, start + int(rng.integers(hop, num_samples // 3)))] if index % 3 else []
        windows = segment_grid(num_samples, hop).tolist()
        truth = np.array(reference_labels(num_samples, hop, regions[f"f{index}"]))
        outputs.append(output(f"f{index}", num_samples, windows, rng.normal(size=len(windows)) + 1.5 * truth))
        lengths[f"f{index}"] = num_samples
    result = evaluate_segments(outputs, regions, lengths, hop_seconds=0.02, threshold=0.0)
    assert result["resolutions_s"] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64]
    for name, resolution in (("20ms", 320), ("160ms", 2560), ("640ms", 10240)):
        scores, labels = result["trials"][name]
        expected_scores, expected_labels = [], []
        for out in outputs:
            window_scores = out.window_logits[:, 1]
            expected_scores += reference_scores(out.num_samples, resolution, out.window_spans, window_scores)
            expected_labels += reference_labels(out.num_samples, resolution, regions[out.id])
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-12)
        assert labels.tolist() == expected_labels
        bona, spoof = np.array(expected_scores)[np.array(expected_labels) == 1], \
            np.array(expected_scores)[np.array(expected_labels) == 0]
        assert compute_metrics(scores, labels)["eer"] == pytest.approx(reference_eer(bona, spoof), abs=1e-12)
    # through the one report machinery: a row per resolution, with every metric of the table
    table = ScoreTable.from_records([{"id": out.id, "score": 0.0 + i, "label": int(not regions[out.id])}
                                     for i, out in enumerate(outputs)])
    document = evaluate(table, segment_trials=result["trials"])
    assert document["groups"]["segment"]["20ms"]["eer"] == compute_metrics(*result["trials"]["20ms"])["eer"]
    text = format_table({**document, "segments": result})
    assert "segment=640ms" in text and "IoU" in text


def test_localisation_on_a_constructed_timeline():
    hop = 1600  # 0.1 s windows without overlap; windows 10..15 ([1.0, 1.6) s) score fake
    windows = [(start, start + hop) for start in range(0, 48_000, hop)]
    scores = np.array([-3.0 if 10 <= index < 16 else 3.0 for index in range(len(windows))])
    exact = localise("a", 48_000, [(16_000, 25_600)], windows, scores, 0.0, 320)
    assert (exact.iou, exact.boundary_errors_s, exact.missed_boundaries, exact.lowest_window_hit) == \
        (1.0, (0.0, 0.0), 0, True)
    shifted = localise("b", 48_000, [(16_480, 26_080)], windows, scores, 0.0, 320)  # truth 30 ms later
    assert shifted.iou == pytest.approx(0.57 / 0.63)
    assert shifted.boundary_errors_s == pytest.approx((0.03, 0.03))
    elsewhere = localise("c", 48_000, [(40_000, 44_800)], windows, scores, 0.0, 320)
    assert (elsewhere.iou, elsewhere.lowest_window_hit) == (0.0, False)
    real = localise("d", 48_000, [], windows, scores, 0.0, 320)
    assert real.iou is None and real.called_fake_s == pytest.approx(0.6) and real.missed_boundaries == 0
    # the threshold is the file decision's: at -4 nothing is called fake, every boundary is missed
    assert localise("e", 48_000, [(16_000, 25_600)], windows, scores, -4.0, 320).missed_boundaries == 2
