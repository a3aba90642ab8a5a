"""Linear logistic-regression calibration of detector scores to log-likelihood ratios.

``llr = slope * score + offset`` is fitted on a development set by prior-weighted logistic
regression: each class carries total weight ``prior`` / ``1 - prior`` whatever its sample count, so
the fit minimises the prior-weighted cross-entropy (at prior 0.5 exactly Cllr), and the prior log-odds
the regression absorbs into its intercept are subtracted so that the result is an LLR, not a
posterior log-odds. The fitted mapping is stored with a model as ``calibration.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.eval.metrics import (ASVSPOOF5_COSTS, DetectionCosts, act_dcf, bayes_threshold, cllr,
                                    split_classes)

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

    def llr(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(scores, dtype=np.float64) + self.offset

    def score_threshold(self, costs: DetectionCosts = ASVSPOOF5_COSTS) -> float:
        """The raw score whose calibrated LLR is the Bayes threshold for ``costs``."""
        if self.slope <= 0:
            raise CalibrationError(f"slope {self.slope} <= 0: the calibration reverses the score orientation")
        return (bayes_threshold(costs) - self.offset) / self.slope

    def to_dict(self) -> dict[str, object]:
        return {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, **asdict(self)}


def fit_calibration(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
                    prior_bona_fide: float = 0.5, score_definition: str = "",
                    fitted_on: dict[str, object] | None = None) -> Calibration:
    """Fit ``llr = slope * score + offset`` on dev scores (label 1 = bona fide)."""
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
                       score_definition=score_definition, fitted_on={**(fitted_on or {}), **dev})


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
    values: dict[str, float] = {}
    for key in ("slope", "offset", "prior_bona_fide"):
        value = document.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CalibrationError(f"{path}: {key}: expected a finite number, got {value!r}")
        values[key] = float(value)
    if not 0 < values["prior_bona_fide"] < 1:
        raise CalibrationError(f"{path}: prior_bona_fide: must be in (0, 1), got {values['prior_bona_fide']}")
    return Calibration(**values, score_definition=str(document.get("score_definition", "")),
                       fitted_on=dict(document.get("fitted_on") or {}))
