"""Metrics against brute-force references written here from the ASVspoof definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from posttrain.eval.metrics import (ASVSPOOF5_COSTS, DetectionCosts, act_dcf, bayes_threshold,
                                    classification_metrics, cllr, compute_metrics, eer,
                                    eer_confidence_interval, metrics_by_group, min_dcf, roc_auc)

# ----------------------------------------------------------------------------- references


def reference_cut_points(bona, spoof):
    """(FRR, FAR, threshold) at every cut of the trials sorted by (score, bona fide first)."""
    trials = sorted([(float(s), 0) for s in bona] + [(float(s), 1) for s in spoof])  # 0 = bona sorts first
    points = []
    for k in range(len(trials) + 1):
        rejected = trials[:k]
        rejected_bona = sum(1 for _, cls in rejected if cls == 0)
        accepted_spoof = sum(1 for _, cls in trials[k:] if cls == 1)
        threshold = rejected[-1][0] if rejected else -math.inf
        points.append((rejected_bona / len(bona), accepted_spoof / len(spoof), threshold))
    return points


def reference_eer(bona, spoof):
    best = None
    for frr, far, threshold in reference_cut_points(bona, spoof):
        if best is None or abs(frr - far) < best[0]:
            best = (abs(frr - far), (frr + far) / 2, threshold)
    return best[1], best[2]


def reference_threshold_sweep(bona, spoof):
    """(FRR, FAR) for every real threshold 'bona fide if score > t'."""
    candidates = [-math.inf] + sorted(set(np.concatenate([bona, spoof]).tolist()))
    return [(np.sum(bona <= t) / bona.size, np.sum(spoof > t) / spoof.size) for t in candidates]


def reference_min_dcf(bona, spoof, p=0.05, c_miss=1.0, c_fa=10.0):
    costs = [c_miss * (1 - p) * frr + c_fa * p * far for frr, far in reference_threshold_sweep(bona, spoof)]
    return min(costs) / min(c_miss * (1 - p), c_fa * p)


def reference_auc(bona, spoof):
    wins = sum(1.0 if b > s else 0.5 if b == s else 0.0 for b in bona for s in spoof)
    return wins / (len(bona) * len(spoof))


def reference_act_dcf(llr_bona, llr_spoof, p=0.05, c_miss=1.0, c_fa=10.0):
    threshold = math.log(c_fa * p / (c_miss * (1 - p)))
    miss = sum(1 for s in llr_bona if s < threshold) / len(llr_bona)
    false_alarm = sum(1 for s in llr_spoof if s >= threshold) / len(llr_spoof)
    return (c_miss * (1 - p) * miss + c_fa * p * false_alarm) / min(c_miss * (1 - p), c_fa * p)


def reference_cllr(llr_bona, llr_spoof):
    bona_part = np.mean([math.log2(1 + math.exp(-s)) for s in llr_bona])
    spoof_part = np.mean([math.log2(1 + math.exp(s)) for s in llr_spoof])
    return 0.5 * (bona_part + spoof_part)


def random_scores(seed, n_bona=150, n_spoof=230, tied=False):
    rng = np.random.default_rng(seed)
    if tied:  # a handful of distinct values, so most cross-class pairs tie
        return rng.integers(0, 4, n_bona).astype(float), rng.integers(-1, 3, n_spoof).astype(float)
    return rng.normal(1.0, 1.5, n_bona), rng.normal(-1.0, 1.5, n_spoof)


CASES = [(seed, tied) for seed in range(3) for tied in (False, True)]


# ----------------------------------------------------------------------------- exact matches


@pytest.mark.parametrize("seed,tied", CASES)
def test_eer_matches_the_asvspoof_definition_exactly(seed, tied):
    bona, spoof = random_scores(seed, tied=tied)
    value, threshold = eer(bona, spoof)
    expected_value, expected_threshold = reference_eer(bona, spoof)
    assert value == expected_value
    if expected_threshold == -math.inf:  # nothing rejected: any threshold below every score
        assert threshold < min(bona.min(), spoof.min())
    else:
        assert threshold == expected_threshold


@pytest.mark.parametrize("seed", range(3))
def test_eer_on_untied_scores_equals_a_plain_threshold_sweep(seed):
    bona, spoof = random_scores(seed)
    sweep = reference_threshold_sweep(bona, spoof)
    best = min(range(len(sweep)), key=lambda i: (abs(sweep[i][0] - sweep[i][1]), i))
    assert eer(bona, spoof)[0] == (sweep[best][0] + sweep[best][1]) / 2


@pytest.mark.parametrize("seed,tied", CASES)
def test_min_dcf_auc_act_dcf_cllr_match_references(seed, tied):
    bona, spoof = random_scores(seed, tied=tied)
    assert min_dcf(bona, spoof)[0] == reference_min_dcf(bona, spoof)
    assert roc_auc(bona, spoof) == reference_auc(bona, spoof)
    assert act_dcf(bona, spoof) == reference_act_dcf(bona, spoof)
    assert cllr(bona, spoof) == pytest.approx(reference_cllr(bona, spoof), rel=1e-12)


def test_min_dcf_with_other_costs_matches_reference():
    bona, spoof = random_scores(7, tied=True)
    costs = DetectionCosts(p_spoof=0.3, c_miss=2.0, c_fa=1.0)
    assert min_dcf(bona, spoof, costs)[0] == reference_min_dcf(bona, spoof, p=0.3, c_miss=2.0, c_fa=1.0)
    assert act_dcf(bona, spoof, costs) == reference_act_dcf(bona, spoof, p=0.3, c_miss=2.0, c_fa=1.0)


def test_min_dcf_threshold_achieves_the_minimum():
    bona, spoof = random_scores(3)
    value, threshold = min_dcf(bona, spoof)
    frr, far = np.mean(bona <= threshold), np.mean(spoof > threshold)
    assert (0.95 * frr + 0.5 * far) / 0.5 == pytest.approx(value, abs=1e-12)


def test_hand_computed_small_case():
    # sorted: 0(s) 1(b) 2(s) 3(b) 4(b); cut after "1": FRR 1/3, FAR 1/2; after "2": FRR 1/3, FAR 0
    bona, spoof = np.array([1.0, 3.0, 4.0]), np.array([0.0, 2.0])
    assert eer(bona, spoof) == (pytest.approx((1 / 3 + 1 / 2) / 2), 1.0)
    assert roc_auc(bona, spoof) == pytest.approx(5 / 6)
    # ASVspoof 5 costs (0.95 FRR + 0.5 FAR) / 0.5 per cut: 1.0, 0.5 (after "0"), 1.133, 0.633, 1.267, 1.9
    assert min_dcf(bona, spoof) == (pytest.approx(0.5), 0.0)


def test_all_tied_scores_get_the_pessimistic_asvspoof_eer():
    # bona fide sorts before spoof on ties: a constant detector has EER 100 %, not 50 %
    assert eer(np.zeros(4), np.zeros(6))[0] == 1.0
    assert roc_auc(np.zeros(4), np.zeros(6)) == 0.5


def test_perfect_separation():
    metrics = compute_metrics([5.0, 6.0, 7.0, -1.0, -2.0], [1, 1, 1, 0, 0])
    assert metrics["eer"] == 0.0 and metrics["min_dcf"] == 0.0 and metrics["auc"] == 1.0
    assert metrics["decision"]["accuracy"] == 1.0


def test_orientation_is_never_swapped():
    bona, spoof = random_scores(0)
    forward, _ = eer(bona, spoof)
    reversed_eer, _ = eer(-bona, -spoof)
    assert forward < 0.3
    assert reversed_eer > 0.5
    assert reversed_eer == reference_eer(-bona, -spoof)[0]
    assert roc_auc(-bona, -spoof) == pytest.approx(1 - roc_auc(bona, spoof))
    metrics = compute_metrics(np.concatenate([-bona, -spoof]), np.r_[np.ones(bona.size), np.zeros(spoof.size)])
    assert metrics["eer"] > 0.5 and metrics["auc"] < 0.5


def test_bayes_threshold_for_asvspoof5():
    assert bayes_threshold(ASVSPOOF5_COSTS) == pytest.approx(math.log(0.5 / 0.95))


# ----------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("threshold", [-0.5, 0.0, 0.7])
def test_classification_metrics_match_sklearn(threshold):
    bona, spoof = random_scores(5)
    scores = np.concatenate([bona, spoof])
    labels = np.r_[np.ones(bona.size, int), np.zeros(spoof.size, int)]
    predicted = (scores >= threshold).astype(int)
    result = classification_metrics(scores, labels, threshold)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert result["precision"] == pytest.approx(precision_score(labels, predicted, pos_label=1))
    assert result["recall"] == pytest.approx(recall_score(labels, predicted, pos_label=1))
    assert result["f1"] == pytest.approx(f1_score(labels, predicted, pos_label=1))
    assert result["positive_class"] == "bona fide"


def test_one_tie_rule_a_score_at_the_threshold_is_bona_fide():
    """actDCF at the Bayes threshold (ASVspoof 5: accept at >=), the classification metrics and the
    score command's decision all call a score exactly at the threshold bona fide."""
    from posttrain.eval.scoring import Decision

    at = bayes_threshold()
    assert act_dcf(np.array([at]), np.array([at - 1.0])) == 0.0  # the bona fide trial at t is accepted
    assert act_dcf(np.array([at + 1.0]), np.array([at])) == pytest.approx(10 * 0.05 / 0.5)  # a false alarm
    result = classification_metrics(np.array([0.0, 0.0, -1.0]), np.array([1, 0, 0]), 0.0)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (1, 1, 1, 0)
    assert result["rule"] == "bona fide if score >= threshold"
    assert Decision.of(None).label(0.0) == "real"


def test_eer_threshold_reproduces_the_eer_frr():
    bona, spoof = random_scores(2)
    scores = np.concatenate([bona, spoof])
    labels = np.r_[np.ones(bona.size, int), np.zeros(spoof.size, int)]
    metrics = compute_metrics(scores, labels)
    decision = metrics["decision"]
    frr = decision["fn"] / bona.size
    far = decision["fp"] / spoof.size
    assert (frr + far) / 2 == pytest.approx(metrics["eer"])


# ----------------------------------------------------------------------------- compute_metrics


def test_compute_metrics_uses_llr_for_act_dcf_and_cllr():
    bona, spoof = random_scores(4)
    scores = np.concatenate([bona, spoof])
    labels = np.r_[np.ones(bona.size, int), np.zeros(spoof.size, int)]
    llr = 0.5 * scores - 0.3
    metrics = compute_metrics(scores, labels, llr)
    assert metrics["llr_source"] == "calibrated"
    assert metrics["act_dcf"] == reference_act_dcf(0.5 * bona - 0.3, 0.5 * spoof - 0.3)
    assert metrics["raw_act_dcf"] == reference_act_dcf(bona, spoof)
    assert metrics["cllr"] == pytest.approx(reference_cllr(0.5 * bona - 0.3, 0.5 * spoof - 0.3), rel=1e-12)
    assert metrics["eer"] == reference_eer(bona, spoof)[0]  # EER never uses the LLRs


def test_single_class_reports_counts_and_why():
    metrics = compute_metrics([0.1, 0.2, 0.3], [0, 0, 0], threshold=0.15)
    assert metrics["eer"] is None and metrics["auc"] is None
    assert "only spoof" in metrics["undefined"]["eer"]
    assert metrics["n_spoof"] == 3 and metrics["n_bona_fide"] == 0
    decision = metrics["decision"]  # a given threshold still gives accuracy
    assert decision["accuracy"] == pytest.approx(1 / 3) and decision["recall"] is None


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels"):
        compute_metrics([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([0.1, float("nan")], [1, 0])


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_seeded_and_brackets_the_eer():
    bona, spoof = random_scores(0, n_bona=600, n_spoof=900)
    first = eer_confidence_interval(bona, spoof, resamples=300, seed=11)
    again = eer_confidence_interval(bona, spoof, resamples=300, seed=11)
    other = eer_confidence_interval(bona, spoof, resamples=300, seed=12)
    assert first == again and first != other
    point = eer(bona, spoof)[0]
    assert first["low"] < point < first["high"]
    # an independent percentile bootstrap (resampling within each class) lands in the same place
    rng = np.random.default_rng(99)
    values = [eer(rng.choice(bona, bona.size), rng.choice(spoof, spoof.size))[0] for _ in range(300)]
    low, high = np.percentile(values, [2.5, 97.5])
    assert first["low"] == pytest.approx(low, abs=0.012) and first["high"] == pytest.approx(high, abs=0.012)


def test_bootstrap_resamples_within_each_class():
    # if classes were mixed by the resampling, a separable set could show errors
    ci = eer_confidence_interval(np.arange(50.0) + 100, np.arange(80.0), resamples=100, seed=0)
    assert ci["low"] == ci["high"] == 0.0


# ----------------------------------------------------------------------------- groups


def test_group_metrics_follow_known_separability():
    values = np.arange(1.0, 21.0)  # group "same": bona fide and spoof have identical scores
    rows = ([(v + 100, 1, "sep", "-") for v in values] + [(v, 0, "sep", "A01") for v in values]
            + [(v, 1, "same", "-") for v in values] + [(v, 0, "same", "A02") for v in values]
            + [(v, 0, "onlyspoof", "A01") for v in values[:5]])
    scores = np.array([r[0] for r in rows])
    labels = np.array([r[1] for r in rows])
    corpus = [r[2] for r in rows]
    attack = [r[3] for r in rows]

    by_corpus = metrics_by_group(scores, labels, corpus)
    assert list(by_corpus) == ["onlyspoof", "same", "sep"]
    assert by_corpus["sep"]["eer"] == 0.0 and by_corpus["sep"]["auc"] == 1.0
    assert by_corpus["same"]["eer"] == 0.5 and by_corpus["same"]["auc"] == 0.5
    assert by_corpus["onlyspoof"]["eer"] is None
    assert "only spoof" in by_corpus["onlyspoof"]["undefined"]["eer"]
    assert by_corpus["onlyspoof"]["n"] == 5

    by_attack = metrics_by_group(scores, labels, attack, pool_bona_fide=True)
    assert list(by_attack) == ["A01", "A02"]  # bona fide rows' "-" is no group
    for name, metrics in by_attack.items():
        assert metrics["n_bona_fide"] == 40
        selected = np.array([a == name or l == 1 for a, l in zip(attack, labels)])
        assert metrics["eer"] == reference_eer(scores[selected & (labels == 1)], scores[selected & (labels == 0)])[0]
    assert by_attack["A01"]["n_spoof"] == 25


def test_group_llr_subsets_follow_the_groups():
    bona, spoof = random_scores(1, n_bona=40, n_spoof=40)
    scores = np.concatenate([bona, spoof])
    labels = np.r_[np.ones(40, int), np.zeros(40, int)]
    groups = ["x" if i % 2 else "y" for i in range(80)]
    llr = 2 * scores
    result = metrics_by_group(scores, labels, groups, llr)
    mask = np.array(groups) == "x"
    assert result["x"]["cllr"] == compute_metrics(scores[mask], labels[mask], llr[mask])["cllr"]
