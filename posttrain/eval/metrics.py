"""Detection metrics with the ASVspoof definitions: EER, minDCF, actDCF, Cllr, AUC, bootstrap CIs.

Conventions (fixed, never inferred from the data): a higher score means *bona fide*; label 1 = real
(bona fide), 0 = fake (spoof). The score orientation is never flipped to the one that gives the
lower EER: a detector that ranks spoofs above bona fide gets an EER above 50 %.

The EER follows the ASVspoof code's definition exactly, so numbers compare with published ones:
the scores ``[bona fide..., spoof...]`` are sorted with a stable sort (cross-class ties: bona fide
first, the pessimistic order), position ``i`` rejects the ``i`` lowest scores, and the EER is the
mean of FRR and FAR at the first position where they are closest, without interpolation. With many
cross-class ties this can differ from an interpolated ROC EER (all-equal scores give 100 %).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

POSITIVE_CLASS = "bona fide"
DECISION_RULE = "bona fide if score >= threshold"


def accepts(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    """THE decision rule (every decision in posttrain goes through here): bona fide when
    ``score >= threshold``. A score exactly at the threshold is accepted, as ASVspoof 5's actDCF
    accepts an LLR at the Bayes threshold. On the uncalibrated logit difference (threshold 0) a
    tie of the two logits is therefore bona fide, where ``argmax`` of [fake, real] would say fake."""
    return np.asarray(scores) >= threshold


@dataclass(frozen=True)
class DetectionCosts:
    """Detection-cost parameters; the default is the ASVspoof 5 setting."""

    p_spoof: float = 0.05
    c_miss: float = 1.0
    c_fa: float = 10.0

    @property
    def normaliser(self) -> float:
        """The cost of the better of the two trivial systems (accept all / reject all)."""
        return min(self.c_miss * (1 - self.p_spoof), self.c_fa * self.p_spoof)


ASVSPOOF5_COSTS = DetectionCosts()


@dataclass(frozen=True)
class DetCurve:
    """FRR/FAR at each cut position of the sorted scores (index 0 rejects nothing)."""

    frr: np.ndarray
    far: np.ndarray
    thresholds: np.ndarray  # thresholds[i]: the highest rejected score (below every score at i = 0)


def split_classes(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(bona fide scores, spoof scores), after checking shapes, labels in {0, 1} and finite scores."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be 1-D of the same length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 1 (bona fide) or 0 (spoof); got {sorted(set(labels.tolist()))}")
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{bad} score(s) are NaN or infinite")
    return scores[labels == 1], scores[labels == 0]


def det_curve(bona: np.ndarray, spoof: np.ndarray) -> DetCurve:
    """The ASVspoof DET curve: stable sort of [bona, spoof], FRR = [0, ...], FAR = [1, ...]."""
    n_bona, n_spoof = bona.size, spoof.size
    if n_bona == 0 or n_spoof == 0:
        raise ValueError(f"a DET curve needs both classes (bona fide {n_bona}, spoof {n_spoof})")
    scores = np.concatenate([bona, spoof])
    is_bona = np.concatenate([np.ones(n_bona, dtype=np.int64), np.zeros(n_spoof, dtype=np.int64)])
    order = np.argsort(scores, kind="stable")
    rejected_bona = np.cumsum(is_bona[order])
    rejected = np.arange(1, scores.size + 1)
    frr = np.concatenate([[0.0], rejected_bona / n_bona])
    far = np.concatenate([[1.0], (n_spoof - (rejected - rejected_bona)) / n_spoof])
    sorted_scores = scores[order]
    below_all = np.nextafter(sorted_scores[0], -np.inf)
    return DetCurve(frr=frr, far=far, thresholds=np.concatenate([[below_all], sorted_scores]))


def eer(bona: np.ndarray, spoof: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) with the ASVspoof definition (see the module docstring)."""
    curve = det_curve(bona, spoof)
    best = int(np.argmin(np.abs(curve.frr - curve.far)))
    return float((curve.frr[best] + curve.far[best]) / 2), float(curve.thresholds[best])


def min_dcf(bona: np.ndarray, spoof: np.ndarray, costs: DetectionCosts = ASVSPOOF5_COSTS
            ) -> tuple[float, float]:
    """(normalised minimum DCF, threshold) over the ASVspoof DET curve.

    The cut positions inside a tie group are dominated by the group's end points (bona fide sorts
    first), so this equals the minimum over real thresholds ``accept if score > t``.
    """
    curve = det_curve(bona, spoof)
    dcf = costs.c_miss * (1 - costs.p_spoof) * curve.frr + costs.c_fa * costs.p_spoof * curve.far
    best = int(np.argmin(dcf))
    return float(dcf[best] / costs.normaliser), float(curve.thresholds[best])


# named operating points: the EER, FAR 1 % (the least FRR with at most 1 % of spoofs accepted), FRR 1 % (the
# least FAR with at most 1 % of bona fide rejected) and the minDCF point
OPERATING_POINTS = ("eer", "far1", "frr1", "min_dcf")
OPERATING_RATE = 0.01


def operating_points(bona: np.ndarray, spoof: np.ndarray, costs: DetectionCosts = ASVSPOOF5_COSTS
                     ) -> dict[str, dict[str, float]]:
    """``{name: {"threshold", "far", "frr"}}`` of each ``OPERATING_POINTS`` entry: an ``accepts`` threshold
    and the rates it gives on these trials, counted at realisable thresholds (a tie group is accepted or
    rejected whole)."""
    ordered_bona, ordered_spoof = np.sort(bona), np.sort(spoof)
    candidates = np.append(np.unique(np.concatenate([bona, spoof])), np.inf)  # +inf accepts nothing
    # counted in trials, not fractions: 3 of 300 is exactly 1 % (a float 1 - 297/300 is not)
    rejected_bona = np.searchsorted(ordered_bona, candidates, side="left")
    accepted_spoof = spoof.size - np.searchsorted(ordered_spoof, candidates, side="left")

    def at(threshold: float) -> dict[str, float]:
        return {"threshold": float(threshold), "far": float(np.mean(spoof >= threshold)),
                "frr": float(np.mean(bona < threshold))}

    eer_accept = float(np.nextafter(eer(bona, spoof)[1], np.inf))
    dcf_accept = float(np.nextafter(min_dcf(bona, spoof, costs)[1], np.inf))
    far1 = candidates[int(np.argmax(accepted_spoof <= math.floor(OPERATING_RATE * spoof.size)))]  # lowest within
    frr1 = candidates[int(np.nonzero(rejected_bona <= math.floor(OPERATING_RATE * bona.size))[0][-1])]  # highest
    return {"eer": at(eer_accept), "far1": at(far1), "frr1": at(frr1), "min_dcf": at(dcf_accept)}


def bayes_threshold(costs: DetectionCosts = ASVSPOOF5_COSTS) -> float:
    """The LLR above which deciding *bona fide* minimises the expected cost."""
    return -math.log(costs.c_miss * (1 - costs.p_spoof) / (costs.c_fa * costs.p_spoof))


def act_dcf(llr_bona: np.ndarray, llr_spoof: np.ndarray, costs: DetectionCosts = ASVSPOOF5_COSTS) -> float:
    """Normalised actual DCF of LLR scores at the Bayes threshold (``accepts``: at >=, as ASVspoof 5)."""
    threshold = bayes_threshold(costs)
    miss_rate = float(np.mean(~accepts(llr_bona, threshold)))
    false_alarm_rate = float(np.mean(accepts(llr_spoof, threshold)))
    cost = costs.c_miss * (1 - costs.p_spoof) * miss_rate + costs.c_fa * costs.p_spoof * false_alarm_rate
    return cost / costs.normaliser


def cllr(llr_bona: np.ndarray, llr_spoof: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits (0 = perfect, 1 = an uninformative LLR of 0)."""
    # logaddexp(0, x) = log(1 + e^x) without overflow for large |x|
    bona_cost = np.mean(np.logaddexp(0.0, -llr_bona))
    spoof_cost = np.mean(np.logaddexp(0.0, llr_spoof))
    return float((bona_cost + spoof_cost) / (2 * math.log(2)))


def roc_auc(bona: np.ndarray, spoof: np.ndarray) -> float:
    """P(bona fide score > spoof score) + P(tie) / 2, via the Mann-Whitney U statistic (exact)."""
    u_statistic = stats.mannwhitneyu(bona, spoof, alternative="greater", method="asymptotic").statistic
    return float(u_statistic / (bona.size * spoof.size))


# the EER's bootstrap CI as `posttrain eval` reports it unless told otherwise (--bootstrap, --seed)
DEFAULT_BOOTSTRAP_RESAMPLES = 1000
DEFAULT_BOOTSTRAP_SEED = 0


def eer_confidence_interval(bona: np.ndarray, spoof: np.ndarray, *, resamples: int, seed: int,
                            confidence_level: float = 0.95) -> dict[str, object]:
    """Percentile bootstrap CI of the EER; each class is resampled on its own (sizes kept)."""
    # scipy draws the resample indices of a whole batch at once: bound that to ~10^7 indices
    batch = max(1, 10_000_000 // (bona.size + spoof.size))
    result = stats.bootstrap((bona, spoof), lambda b, s: eer(b, s)[0], n_resamples=resamples, batch=batch,
                             paired=False, vectorized=False, method="percentile",
                             confidence_level=confidence_level, rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return {"low": float(interval.low), "high": float(interval.high), "confidence_level": confidence_level,
            "resamples": resamples, "seed": seed, "method": "percentile bootstrap, resampled within each class"}


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, object]:
    """Confusion counts and accuracy/precision/recall/F1 with *bona fide* as the positive class.

    A sample is called bona fide by ``accepts`` (``score >= threshold``). Undefined ratios are None.
    """
    predicted = accepts(scores, threshold)
    actual = labels == 1
    tp, fp = int(np.sum(predicted & actual)), int(np.sum(predicted & ~actual))
    fn, tn = int(np.sum(~predicted & actual)), int(np.sum(~predicted & ~actual))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else None)
    return {"threshold": float(threshold), "positive_class": POSITIVE_CLASS, "rule": DECISION_RULE,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": (tp + tn) / scores.size,
            "precision": precision, "recall": recall, "f1": f1}


@dataclass(frozen=True)
class Trials:
    """One set of two-class trials as the metrics read them: scores, and the LLRs actDCF and Cllr use."""

    bona: np.ndarray
    spoof: np.ndarray
    llr_bona: np.ndarray
    llr_spoof: np.ndarray
    costs: DetectionCosts


@dataclass(frozen=True)
class Metric:
    """A report metric in one place: its key in ``compute_metrics``' output (``companions``: the keys of
    the extra values its function returns, e.g. a threshold), its function, its column in report tables
    and model cards, and its format (value x ``scale`` with ``digits`` decimals)."""

    name: str
    column: str
    compute: Callable[[Trials], float | tuple[float, ...]]
    companions: tuple[str, ...] = ()
    scale: float = 1.0
    digits: int = 4

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.name, *self.companions)

    def values(self, trials: Trials) -> dict[str, float]:
        computed = self.compute(trials)
        return dict(zip(self.keys, computed if isinstance(computed, tuple) else (computed,)))

    def format(self, value: object) -> str | None:
        return None if value is None else f"{float(value) * self.scale:.{self.digits}f}"


# The metrics every report and model card shows, in column order. A new metric: one row here.
METRICS: tuple[Metric, ...] = (
    Metric("eer", "EER%", lambda t: eer(t.bona, t.spoof), ("eer_threshold",), scale=100.0, digits=2),
    Metric("min_dcf", "minDCF", lambda t: min_dcf(t.bona, t.spoof, t.costs), ("min_dcf_threshold",)),
    Metric("act_dcf", "actDCF", lambda t: act_dcf(t.llr_bona, t.llr_spoof, t.costs)),
    Metric("cllr", "Cllr", lambda t: cllr(t.llr_bona, t.llr_spoof)),
    Metric("auc", "AUC", lambda t: roc_auc(t.bona, t.spoof)),
)


def eer_operating_threshold(eer_threshold: float | None) -> float | None:
    """The ``accepts`` threshold of the EER operating point: the EER threshold is the highest REJECTED
    score (ASVspoof's DET curve), so the point accepts exactly the scores above it, i.e. ``>=`` the
    next float up. Decisions there reproduce the EER's FRR and FAR."""
    return None if eer_threshold is None else float(np.nextafter(eer_threshold, np.inf))


def compute_metrics(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                    llr: Sequence[float] | np.ndarray | None = None, *,
                    costs: DetectionCosts = ASVSPOOF5_COSTS, threshold: float | None = None,
                    bootstrap_resamples: int = 0, seed: int = 0, confidence_level: float = 0.95,
                    ) -> dict[str, object]:
    """Every metric of one set of trials, as a JSON-ready dict.

    EER, minDCF and AUC use ``scores``. actDCF and Cllr use ``llr`` when given (calibrated LLRs;
    ``raw_act_dcf``/``raw_cllr`` then keep the raw-score values) and otherwise treat the raw score
    as an LLR. ``threshold`` sets the decision threshold for accuracy/precision/recall/F1 (default:
    the EER operating point, ``eer_operating_threshold``). Metrics that need both classes are None with the reason in ``undefined``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    bona, spoof = split_classes(scores, labels)
    if scores.size == 0:
        raise ValueError("no scores to evaluate")
    result: dict[str, object] = {"n": int(scores.size), "n_bona_fide": int(bona.size), "n_spoof": int(spoof.size),
                                 "costs": asdict(costs), "llr_source": "raw score" if llr is None else "calibrated"}
    undefined: dict[str, str] = {}
    if bona.size and spoof.size:
        trials = Trials(bona, spoof, *((bona, spoof) if llr is None else split_classes(llr, labels)), costs)
        for metric in METRICS:
            result.update(metric.values(trials))
        if llr is not None:
            result["raw_act_dcf"], result["raw_cllr"] = act_dcf(bona, spoof, costs), cllr(bona, spoof)
        result["eer_ci"] = (eer_confidence_interval(bona, spoof, resamples=bootstrap_resamples, seed=seed,
                                                    confidence_level=confidence_level)
                            if bootstrap_resamples > 0 else None)
    else:
        present = "bona fide" if bona.size else "spoof"
        reason = f"only {present} samples (n={scores.size}): needs both bona fide and spoof"
        for name in (*(key for metric in METRICS for key in metric.keys), "eer_ci"):
            result[name] = None
            undefined[name] = reason
    decision_threshold = threshold if threshold is not None else eer_operating_threshold(result["eer_threshold"])
    if decision_threshold is None:
        result["decision"] = None
        undefined["decision"] = "no threshold given and no EER threshold (single class)"
    else:
        result["decision"] = {**classification_metrics(scores, labels, decision_threshold),
                              "threshold_source": "given" if threshold is not None else "eer"}
    result["undefined"] = undefined
    return result


def group_mask(groups: np.ndarray, labels: np.ndarray, name: str, *, pool_bona_fide: bool) -> np.ndarray:
    """The trials of group ``name``; with ``pool_bona_fide``, its spoofs plus every bona fide trial."""
    members = np.asarray(groups, dtype=object) == name
    return (members & (labels != 1)) | (labels == 1) if pool_bona_fide else members


def metrics_by_group(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                     groups: Sequence[str], llr: Sequence[float] | np.ndarray | None = None, *,
                     pool_bona_fide: bool = False, **options: object) -> dict[str, dict[str, object]]:
    """``compute_metrics`` per group value, in sorted group order.

    ``pool_bona_fide`` is the per-attack convention: the groups are the values on spoof samples and
    each is scored against *all* bona fide samples (whose own group values are ignored).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    groups = np.asarray(groups, dtype=object)
    if groups.shape != scores.shape:
        raise ValueError(f"{groups.size} group values for {scores.size} scores")
    llr_array = None if llr is None else np.asarray(llr, dtype=np.float64)
    names = sorted(set(groups[labels != 1].tolist()) if pool_bona_fide else set(groups.tolist()))
    results: dict[str, dict[str, object]] = {}
    for name in names:
        selected = group_mask(groups, labels, name, pool_bona_fide=pool_bona_fide)
        group_result = compute_metrics(scores[selected], labels[selected],
                                       None if llr_array is None else llr_array[selected], **options)
        group_result["bona_fide_pool"] = "all bona fide samples" if pool_bona_fide else "this group"
        results[str(name)] = group_result
    return results
