"""Calibration recovers known LLR mappings and round-trips through calibration.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize

from posttrain.eval.calibration import (Calibration, CalibrationError, fit_calibration, llr_quality,
                                        load_calibration, save_calibration)
from posttrain.eval.metrics import bayes_threshold, cllr

MU_BONA, MU_SPOOF, SIGMA = 2.0, -1.0, 1.5
# equal-variance Gaussians: log N(s; mu_b, sigma) / N(s; mu_s, sigma) is affine in s
TRUE_SLOPE = (MU_BONA - MU_SPOOF) / SIGMA**2
TRUE_OFFSET = (MU_SPOOF**2 - MU_BONA**2) / (2 * SIGMA**2)


def gaussian_set(seed, n_bona, n_spoof):
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(MU_BONA, SIGMA, n_bona), rng.normal(MU_SPOOF, SIGMA, n_spoof)])
    return scores, np.r_[np.ones(n_bona, int), np.zeros(n_spoof, int)]


@pytest.mark.parametrize("prior", [0.5, 0.2])
def test_recovers_the_true_llr_mapping_with_unbalanced_classes(prior):
    # 1 bona fide : 6 spoof; a fit that kept the class or prior log-odds in the offset would be off by > 1
    scores, labels = gaussian_set(0, 4000, 24000)
    calibration = fit_calibration(scores, labels, prior_bona_fide=prior)
    assert calibration.slope == pytest.approx(TRUE_SLOPE, abs=0.06)
    assert calibration.offset == pytest.approx(TRUE_OFFSET, abs=0.06)


def test_fit_minimises_the_prior_weighted_objective():
    raw, labels = gaussian_set(1, 500, 1500)
    scores = 0.4 * raw + 3.0  # miscalibrated
    prior = 0.3
    bona, spoof = scores[labels == 1], scores[labels == 0]
    logit_prior = math.log(prior / (1 - prior))

    def objective(params):
        a, b = params
        return (prior * np.mean(np.logaddexp(0, -(a * bona + b + logit_prior)))
                + (1 - prior) * np.mean(np.logaddexp(0, a * spoof + b + logit_prior)))

    reference = minimize(objective, x0=[1.0, 0.0], method="Nelder-Mead",
                         options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).x
    calibration = fit_calibration(scores, labels, prior_bona_fide=prior)
    assert calibration.slope == pytest.approx(reference[0], abs=1e-4)
    assert calibration.offset == pytest.approx(reference[1], abs=1e-4)


def test_calibrated_cllr_is_not_worse_than_raw():
    raw, labels = gaussian_set(2, 800, 800)
    scores = 3.0 * (TRUE_SLOPE * raw + TRUE_OFFSET) + 2.0  # overconfident and shifted "LLRs"
    calibration = fit_calibration(scores, labels)
    held_out_raw, held_out_labels = gaussian_set(3, 800, 800)
    held_out = 3.0 * (TRUE_SLOPE * held_out_raw + TRUE_OFFSET) + 2.0
    for data, data_labels in ((scores, labels), (held_out, held_out_labels)):
        raw_cllr = cllr(data[data_labels == 1], data[data_labels == 0])
        calibrated = calibration.llr(data)
        assert cllr(calibrated[data_labels == 1], calibrated[data_labels == 0]) < raw_cllr
    dev = calibration.fitted_on
    assert dev["calibrated"]["cllr"] <= dev["raw"]["cllr"]
    assert dev["n_bona_fide"] == 800
    assert dev["raw"] == llr_quality(scores, labels)


def test_score_threshold_maps_to_the_bayes_threshold():
    calibration = Calibration(slope=1.7, offset=-0.4)
    threshold = calibration.score_threshold()
    assert calibration.llr([threshold])[0] == pytest.approx(bayes_threshold())
    with pytest.raises(CalibrationError, match="orientation"):
        Calibration(slope=-1.0, offset=0.0).score_threshold()


def test_save_load_round_trip(tmp_path):
    scores, labels = gaussian_set(4, 300, 300)
    calibration = fit_calibration(scores, labels, score_definition="real logit minus fake logit",
                                  fitted_on={"path": "dev.csv"})
    path = save_calibration(calibration, tmp_path / "model" / "calibration.json")
    loaded = load_calibration(path)
    assert loaded == calibration
    assert np.array_equal(loaded.llr(scores), calibration.llr(scores))
    assert not [p for p in path.parent.iterdir() if p.name != "calibration.json"]  # no temp file left


def test_load_names_the_file_and_key(tmp_path):
    path = tmp_path / "calibration.json"
    document = Calibration(slope=1.0, offset=0.0).to_dict()
    path.write_text(json.dumps({**document, "slope": "steep"}))
    with pytest.raises(CalibrationError, match=r"calibration\.json: slope"):
        load_calibration(path)
    path.write_text(json.dumps({**document, "prior_bona_fide": 1.5}))
    with pytest.raises(CalibrationError, match="prior_bona_fide"):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match=str(path)):
        load_calibration(path)


def test_single_class_cannot_be_fitted():
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration([0.1, 0.2], [1, 1])
