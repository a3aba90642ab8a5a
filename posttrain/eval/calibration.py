"""Linear logistic-regression calibration of detector scores to log-likelihood ratios.

``llr = slope * score + offset`` is fitted on a development set by prior-weighted logistic
regression: each class carries total weight ``prior`` / ``1 - prior`` whatever its sample count, so
the fit minimises the prior-weighted cross-entropy (at prior 0.5 exactly Cllr), and the prior log-odds
the regression absorbs into its intercept are subtracted so that the result is an LLR, not a
posterior log-odds. The fitted mapping is stored with a model as ``calibration.json``, together with the
decision thresholds of the named operating points (``metrics.OPERATING_POINTS``: EER, FAR 1 %, FRR 1 %,
minDCF) on the same development split, under that split's name: ``--operating-point far1`` picks one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.eval.metrics import (ASVSPOOF5_COSTS, OPERATING_POINTS, DetectionCosts, act_dcf, bayes_threshold,
                                    cllr, operating_points, split_classes)

CALIBRATION_FORMAT = "posttrain-calibration"
CALIBRATION_VERSION = 1


class CalibrationError(ValueError):
    """A calibration file that cannot be used, named with the offending key."""


@dataclass(frozen=True)
class Calibration:
    slope: float
    offset: float
    prior_bona_fide: float = 0.5
    score_definition: str = ""
    fitted_on: dict[str, object] = field(default_factory=dict)  # dev-set identity, counts, dev metrics
    dev_split: str = ""  # the name of the development split it and its operating points were fitted on
    # name -> {"threshold" (on the raw score; inf: accept nothing), "far", "frr" on the dev split}
    operating_points: dict[str, dict[str, float]] = field(default_factory=dict)

    def llr(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def probability(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated P(bona fide) of raw scores: the posterior at the calibration's own prior."""
        from scipy.special import expit

        prior = self.prior_bona_fide
        return expit(self.llr(scores) + math.log(prior / (1.0 - prior)))

    def score_threshold(self, costs: DetectionCosts = ASVSPOOF5_COSTS) -> float:
        """The raw score whose calibrated LLR is the Bayes threshold for ``costs``."""
        if self.slope <= 0:
            raise CalibrationError(f"slope {self.slope} <= 0: the calibration reverses the score orientation")
        return (bayes_threshold(costs) - self.offset) / self.slope

    def operating_threshold(self, name: str) -> float:
        """The raw-score threshold of operating point ``name`` (bona fide when score >= it)."""
        if name not in self.operating_points:
            fitted = ", ".join(self.operating_points) or "none"
            raise CalibrationError(f"operating point {name!r}: this calibration holds {fitted} (fitted on "
                                   f"{self.dev_split or 'an unnamed split'}); refit it with `posttrain metrics "
                                   f"--fit-calibration DEV_SCORES --dev-split NAME` to get {', '.join(OPERATING_POINTS)}")
        return self.operating_points[name]["threshold"]

    def to_dict(self) -> dict[str, object]:
        document = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, **asdict(self)}
        # JSON has no infinity: a threshold that accepts nothing is written as null
        document["operating_points"] = {name: {**point, "threshold": point["threshold"]
                                               if math.isfinite(point["threshold"]) else None}
                                        for name, point in self.operating_points.items()}
        return document


def fit_calibration(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
                    prior_bona_fide: float = 0.5, score_definition: str = "",
                    fitted_on: dict[str, object] | None = None, dev_split: str = "") -> Calibration:
    """Fit ``llr = slope * score + offset`` on dev scores (label 1 = bona fide), and the operating points'
    thresholds on the same scores."""
    if not 0 < prior_bona_fide < 1:
        raise ValueError(f"prior_bona_fide must be in (0, 1), got {prior_bona_fide}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    bona, spoof = split_classes(scores, labels)
    if bona.size == 0 or spoof.size == 0:
        raise ValueError(f"calibration needs both classes (bona fide {bona.size}, spoof {spoof.size})")
    # weights sum to N per the whole set, so the solver's tolerance means the same at any size
    weights = np.where(labels == 1, prior_bona_fide / bona.size, (1 - prior_bona_fide) / spoof.size) * scores.size
    from sklearn.linear_model import LogisticRegression  # here: reading a calibration needs no sklearn

    # C=inf: no regularisation, the fit is the plain maximum-likelihood affine map
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000)
    model.fit(scores[:, None], labels, sample_weight=weights)
    slope = float(model.coef_[0, 0])
    offset = float(model.intercept_[0]) - math.log(prior_bona_fide / (1 - prior_bona_fide))
    dev = {"n_bona_fide": int(bona.size), "n_spoof": int(spoof.size),
           "raw": llr_quality(scores, labels), "calibrated": llr_quality(slope * scores + offset, labels)}
    return Calibration(slope=slope, offset=offset, prior_bona_fide=prior_bona_fide,
                       score_definition=score_definition, fitted_on={**(fitted_on or {}), **dev}, dev_split=dev_split,
                       operating_points=operating_points(bona, spoof))


def llr_quality(llr: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                costs: DetectionCosts = ASVSPOOF5_COSTS) -> dict[str, float]:
    """actDCF and Cllr of scores read as LLRs."""
    llr_bona, llr_spoof = split_classes(llr, labels)
    return {"act_dcf": act_dcf(llr_bona, llr_spoof, costs), "cllr": cllr(llr_bona, llr_spoof)}


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    path = Path(path)
    write_bytes_atomic(path, (json.dumps(calibration.to_dict(), indent=2) + "\n").encode("utf-8"))
    return path


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CalibrationError(f"{path}: cannot read a calibration file: {error}") from None
    if not isinstance(document, dict) or document.get("format") != CALIBRATION_FORMAT:
        raise CalibrationError(f"{path}: format: expected {CALIBRATION_FORMAT!r}")
    if document.get("version") != CALIBRATION_VERSION:
        raise CalibrationError(f"{path}: version: expected {CALIBRATION_VERSION}, got {document.get('version')!r}")
    return calibration_from_dict(document, str(path))


def calibration_from_dict(document: dict, where: str) -> Calibration:
    """A calibration from its ``to_dict`` document (a file's, or the entry a model's ``posttrain.json``
    keeps); ``where`` names it in errors."""
    values: dict[str, float] = {}
    for key in ("slope", "offset", "prior_bona_fide"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CalibrationError(f"{where}: {key}: expected a finite number, got {value!r}")
        values[key] = float(value)
    if not 0 < values["prior_bona_fide"] < 1:
        raise CalibrationError(f"{where}: prior_bona_fide: must be in (0, 1), got {values['prior_bona_fide']}")
    return Calibration(**values, score_definition=str(document.get("score_definition", "")),
                       fitted_on=dict(document.get("fitted_on") or {}), dev_split=str(document.get("dev_split", "")),
                       operating_points=_read_operating_points(document.get("operating_points") or {}, where))


def _read_operating_points(points: object, where: str) -> dict[str, dict[str, float]]:
    if not isinstance(points, dict) or not set(points) <= set(OPERATING_POINTS):
        raise CalibrationError(f"{where}: operating_points: expected a mapping of {', '.join(OPERATING_POINTS)}")
    read: dict[str, dict[str, float]] = {}
    for name, point in points.items():
        threshold = point.get("threshold") if isinstance(point, dict) else "missing"
        if threshold is None:
            threshold = math.inf
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise CalibrationError(f"{where}: operating_points.{name}.threshold: expected a number, got {threshold!r}")
        read[name] = {"threshold": float(threshold), "far": float(point.get("far", math.nan)),
                      "frr": float(point.get("frr", math.nan))}
    return read
