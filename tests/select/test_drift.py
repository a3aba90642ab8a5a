"""The drift distances against independent references (scipy per projection, scikit-learn's Ledoit-Wolf,
the closed-form Gaussian KL written here), and the permutation null: calibrated when nothing drifts,
decisive when the mean moves; the served sliced W1 is the same number."""

import numpy as np
import pytest
from scipy import stats

from posttrain.select.drift import (DriftConfig, SlicedReference, drift_test, gaussian_kl, project, shrunk_covariance,
                                    sliced_ks, sliced_w1, unit_directions)


def _sets(seed: int = 0, n: int = 150, m: int = 90, dim: int = 12, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim))
    return rng.standard_normal((n, dim)) @ mixing, rng.standard_normal((m, dim)) @ mixing + shift


def test_sliced_distances_equal_scipy_on_every_projection():
    first, second = _sets(shift=0.3)
    second[:5] = first[:5]  # values tied across the sets
    directions = unit_directions(first.shape[1], 16, seed=3)
    assert np.allclose(np.linalg.norm(directions, axis=0), 1.0)
    px, py = project(first, directions), project(second, directions)
    expected_w1 = np.mean([stats.wasserstein_distance(a, b) for a, b in zip(px, py)])
    expected_ks = np.mean([stats.ks_2samp(a, b).statistic for a, b in zip(px, py)])
    assert sliced_w1(first, second, directions) == pytest.approx(expected_w1, rel=1e-10)
    assert sliced_ks(first, second, directions) == pytest.approx(expected_ks, rel=1e-10)


def test_sliced_ks_waits_for_the_end_of_a_run_of_ties():
    """float16 embeddings tie: the CDFs are compared after every tied value is taken, as scipy does."""
    first = np.array([[0.0], [1.0], [1.0], [2.0]])
    second = np.array([[1.0], [1.0], [3.0]])
    direction = np.ones((1, 1))
    assert sliced_ks(first, second, direction) == pytest.approx(stats.ks_2samp([0, 1, 1, 2], [1, 1, 3]).statistic)


def test_shrunk_covariance_is_ledoit_wolf_and_kl_is_the_closed_form():
    from sklearn.covariance import ledoit_wolf

    incoming, reference = _sets(seed=1, n=40, m=30, dim=64, shift=0.2)  # fewer rows than dimensions
    for rows in (incoming, reference):
        covariance, shrinkage = shrunk_covariance(rows)
        expected, expected_shrinkage = ledoit_wolf(rows)
        assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-9) and 0 < shrinkage < 1
        np.testing.assert_allclose(covariance, expected, rtol=1e-9, atol=1e-12)
    cov_in, cov_ref = ledoit_wolf(incoming)[0], ledoit_wolf(reference)[0]
    gap = incoming.mean(axis=0) - reference.mean(axis=0)
    inverse = np.linalg.inv(cov_ref)
    closed_form = 0.5 * (np.trace(inverse @ cov_in) + gap @ inverse @ gap - len(gap)
                         + np.linalg.slogdet(cov_ref)[1] - np.linalg.slogdet(cov_in)[1])
    assert gaussian_kl(incoming, reference) == pytest.approx(closed_form, rel=1e-8)
    fixed = shrunk_covariance(reference, 0.25)[0]
    sample = np.cov(reference, rowvar=False, bias=True)
    np.testing.assert_allclose(fixed, 0.75 * sample + 0.25 * np.trace(sample) / 64 * np.eye(64), rtol=1e-10)
    assert gaussian_kl(reference, reference) == pytest.approx(0.0, abs=1e-9)


def test_a_few_hundred_embeddings_in_1024_dimensions_give_a_finite_kl_and_no_shrinkage_is_refused():
    rng = np.random.default_rng(2)
    reference, incoming = rng.standard_normal((300, 1024)), rng.standard_normal((200, 1024))
    assert np.isfinite(gaussian_kl(incoming, reference)) and gaussian_kl(incoming, reference) > 0
    with pytest.raises(ValueError, match="singular"):
        gaussian_kl(incoming, reference, shrinkage=0.0)


def test_the_null_is_calibrated_without_drift_and_decisive_with_it():
    """Same distribution: p-values spread over (0, 1] (about 5 % of them at or below 0.05); a mean shift
    of about half a standard deviation: every distance above its threshold with the smallest p-value."""
    cfg = DriftConfig(projections=16, permutations=60)
    p_values = np.array([[r.p_value for r in drift_test(*_sets(seed=seed), DriftConfig(
        projections=16, permutations=60, seed=seed)).results] for seed in range(40)])
    assert 0.35 < p_values.mean() < 0.65 and np.mean(p_values <= 0.05) <= 0.15, p_values.mean(axis=0)
    shifted = drift_test(*_sets(seed=99, shift=1.5), cfg)
    for result in shifted.results:
        assert result.drift and result.p_value == pytest.approx(1 / 61) and result.percentile == 100.0, result


def test_drift_test_is_seeded_subsamples_and_refuses_bad_sets():
    reference, incoming = _sets(n=300, m=50)
    cfg = DriftConfig(projections=8, permutations=20, max_rows_per_set=100, seed=4)
    first, again = drift_test(reference, incoming, cfg), drift_test(reference, incoming, cfg)
    assert first.to_dict() == again.to_dict()
    assert (first.reference_rows, first.reference_total, first.incoming_rows) == (100, 300, 50)
    with pytest.raises(ValueError, match="different shapes"):
        drift_test(reference, incoming[:, :3], cfg)
    broken = incoming.copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="incoming: 1 embedding"):
        drift_test(reference, broken, cfg)
    for key, value in (("projections", 0), ("quantile", 1.0), ("shrinkage", 1.5), ("distances", ("mmd",))):
        with pytest.raises(ValueError, match=f"drift.{key}"):
            DriftConfig(**{key: value})


def test_served_reference_gives_the_same_sliced_w1_and_a_threshold_only_when_large_enough():
    reference, window = _sets(n=400, m=50, shift=1.0)
    served = SlicedReference(reference, projections=32, seed=5)
    assert served.w1(window) == pytest.approx(sliced_w1(reference, window, unit_directions(12, 32, 5)), rel=1e-12)
    threshold = served.null_threshold(50, draws=50)
    assert threshold is not None and served.w1(window) > threshold > served.w1(window - 1.0)
    assert served.null_threshold(250) is None
