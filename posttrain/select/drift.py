"""Data drift between two sets of utterance embeddings (numpy and scipy only; no torch).

AntiDeepfake's drift monitoring (``README_drift.md``; Wang, Ge, Yamagishi, "Towards Data Drift Monitoring
for Speech Deepfake Detection in the context of MLOps", arXiv 2509.10086) estimates the distribution of
the embeddings of incoming data and of a reference set and takes a distance between the two as the
drift value; the paper compares Wasserstein-1, Kullback-Leibler and Kolmogorov-Smirnov distances
(``docs/drift.md`` says what is known of its estimators). Here:

``sliced_w1``
    Wasserstein-1 between the two sets projected on ``projections`` random unit directions (seeded),
    averaged over the directions (sliced Wasserstein): each 1-D distance is exact on the empirical
    distributions (the area between the two CDFs), and no density is estimated in D dimensions.
``sliced_ks``
    The two-sample Kolmogorov-Smirnov statistic (largest CDF gap) on the same directions, averaged.
``gaussian_kl``
    KL(incoming || reference) between Gaussians fitted to each set. A covariance in D = 1024 dimensions
    from a few hundred embeddings is singular, so each is shrunk towards a scaled identity, by the
    Ledoit-Wolf (2004) analytic shrinkage unless a fixed ``shrinkage`` is given.

Every value is judged against a **permutation null**: reference and incoming rows are pooled, split at
random into sets of the same sizes ``permutations`` times, and the distance of each split is computed.
Under "no drift" the observed value is one more draw of that null: the verdict is drift when it is above
the null's ``quantile`` (95 %), and the p-value is ``(1 + #null >= value) / (1 + permutations)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from scipy import linalg

DISTANCES = ("sliced_w1", "sliced_ks", "gaussian_kl")


@dataclass(frozen=True)
class DriftConfig:
    distances: tuple[str, ...] = DISTANCES
    projections: int = 128  # random unit directions of the sliced distances
    permutations: int = 200  # resampled splits of the permutation null
    quantile: float = 0.95  # the null's quantile above which a value is called drift
    max_rows_per_set: int = 5000  # larger sets are subsampled (seeded) for the value and the null alike
    shrinkage: float | None = None  # covariance shrinkage of gaussian_kl in [0, 1]; None: Ledoit-Wolf's
    seed: int = 0  # directions, subsampling and permutations

    def __post_init__(self):
        unknown = [name for name in self.distances if name not in DISTANCES]
        if not self.distances or unknown:
            raise ValueError(f"drift.distances: {list(self.distances)} has unknown or no names; known: {DISTANCES}")
        for key in ("projections", "permutations", "max_rows_per_set"):
            if getattr(self, key) < 1:
                raise ValueError(f"drift.{key}: must be >= 1, got {getattr(self, key)}")
        if not 0.5 <= self.quantile < 1:
            raise ValueError(f"drift.quantile: must be in [0.5, 1), got {self.quantile}")
        if self.shrinkage is not None and not 0 <= self.shrinkage <= 1:
            raise ValueError(f"drift.shrinkage: must be in [0, 1] or None (Ledoit-Wolf), got {self.shrinkage}")


# ---------------------------------------------------------------------------------- distances


def unit_directions(dim: int, count: int, seed: int) -> np.ndarray:
    """``[dim, count]`` directions drawn uniformly on the unit sphere (normalised Gaussians), seeded."""
    directions = np.random.default_rng(seed).standard_normal((dim, count))
    return directions / np.linalg.norm(directions, axis=0, keepdims=True)


def project(rows: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """``[count, n]`` float64: the ``[n, dim]`` rows projected on each direction."""
    return (np.asarray(rows, dtype=np.float64) @ directions).T


def _cdf_gaps(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per projection (``[P, n]`` and ``[P, m]``): |F - G| of the two empirical CDFs just after each pooled
    value but the last, and the distance to the next pooled value (0 within ties), both ``[P, n + m - 1]``."""
    n, m = first.shape[1], second.shape[1]
    pooled = np.concatenate([first, second], axis=1)
    order = np.argsort(pooled, axis=1, kind="stable")
    values = np.take_along_axis(pooled, order, axis=1)
    # F - G climbs 1/n at a value of the first set and falls 1/m at one of the second
    gaps = np.abs(np.cumsum(np.where(order < n, 1.0 / n, -1.0 / m), axis=1))[:, :-1]
    return gaps, np.diff(values, axis=1)


def sliced_w1_projected(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over projections of the Wasserstein-1 distance: the area between the two CDFs."""
    gaps, widths = _cdf_gaps(first, second)
    return float(np.mean(np.sum(gaps * widths, axis=1)))


def sliced_ks_projected(first: np.ndarray, second: np.ndarray) -> float:
    """Mean over projections of the KS statistic; the CDFs are compared only past a whole run of tied
    values (float16 embeddings tie), where both have taken every tied value."""
    gaps, widths = _cdf_gaps(first, second)
    return float(np.mean(np.max(np.where(widths > 0, gaps, 0.0), axis=1)))


def sliced_w1(first: np.ndarray, second: np.ndarray, directions: np.ndarray) -> float:
    return sliced_w1_projected(project(first, directions), project(second, directions))


def sliced_ks(first: np.ndarray, second: np.ndarray, directions: np.ndarray) -> float:
    return sliced_ks_projected(project(first, directions), project(second, directions))


def shrunk_covariance(rows: np.ndarray, shrinkage: float | None = None) -> tuple[np.ndarray, float]:
    """``(covariance, shrinkage used)``: ``(1 - a) S + a (tr S / D) I`` of the maximum-likelihood covariance
    ``S``; ``a`` is Ledoit and Wolf's (2004) estimate of the best shrinkage when ``shrinkage`` is None."""
    centred = np.asarray(rows, dtype=np.float64)
    centred = centred - centred.mean(axis=0)
    n, dim = centred.shape
    sample = centred.T @ centred / n
    scale = np.trace(sample) / dim
    if not scale > 0:
        raise ValueError(f"gaussian_kl: the {n} embeddings are all equal: no covariance to fit")
    if shrinkage is None:
        # ||S - scale I||^2 (how far S is from the target) vs the variance of S's estimate: sum over
        # rows of ||x x^T - S||^2 / n^2, which is (sum ||x||^4 - n ||S||^2) / n^2
        frobenius = np.sum(sample * sample)
        distance = (frobenius - 2 * scale * np.trace(sample) + dim * scale**2) / dim
        spread = (np.sum(np.sum(centred**2, axis=1) ** 2) / n - frobenius) / (dim * n)
        shrinkage = 0.0 if distance == 0 else float(min(spread, distance) / distance)
    return (1 - shrinkage) * sample + shrinkage * scale * np.eye(dim), shrinkage


def gaussian_kl(incoming: np.ndarray, reference: np.ndarray, shrinkage: float | None = None) -> float:
    """KL(N_incoming || N_reference) in nats, of Gaussians with each set's mean and shrunk covariance."""
    cov_in, _ = shrunk_covariance(incoming, shrinkage)
    cov_ref, _ = shrunk_covariance(reference, shrinkage)
    try:
        factor_ref = linalg.cho_factor(cov_ref)
        factor_in = linalg.cho_factor(cov_in)
    except linalg.LinAlgError:
        raise ValueError("gaussian_kl: a covariance is singular (more dimensions than embeddings?): "
                         "use shrinkage > 0 or the Ledoit-Wolf default") from None
    mean_gap = np.mean(incoming, axis=0, dtype=np.float64) - np.mean(reference, axis=0, dtype=np.float64)
    log_det_ref = 2 * np.sum(np.log(np.diag(factor_ref[0])))
    log_det_in = 2 * np.sum(np.log(np.diag(factor_in[0])))
    trace = np.trace(linalg.cho_solve(factor_ref, cov_in))
    mahalanobis = mean_gap @ linalg.cho_solve(factor_ref, mean_gap)
    return float(0.5 * (trace + mahalanobis - len(mean_gap) + log_det_ref - log_det_in))


# A distance prepared on the pooled rows -> the distance between two index sets of them (reference,
# incoming): projections are computed once and a permutation only re-indexes them.
Split = Callable[[np.ndarray, np.ndarray], float]


def _prepared(name: str, pooled: np.ndarray, cfg: DriftConfig) -> Split:
    if name == "gaussian_kl":
        return lambda ref, inc: gaussian_kl(pooled[inc], pooled[ref], cfg.shrinkage)
    projected = project(pooled, unit_directions(pooled.shape[1], cfg.projections, cfg.seed))
    between = sliced_w1_projected if name == "sliced_w1" else sliced_ks_projected
    return lambda ref, inc: between(projected[:, ref], projected[:, inc])


# ------------------------------------------------------------------------------ the test


@dataclass(frozen=True)
class DistanceResult:
    distance: str
    value: float
    threshold: float  # the null's ``quantile``
    p_value: float
    percentile: float  # share of the null below the value, %
    null: tuple[float, ...] = field(repr=False)

    @property
    def drift(self) -> bool:
        return self.value > self.threshold

    def to_dict(self) -> dict:
        null = np.asarray(self.null)
        return {"distance": self.distance, "value": self.value, "threshold": self.threshold, "p_value": self.p_value,
                "percentile": self.percentile, "verdict": "drift" if self.drift else "no drift",
                "null": {"mean": float(null.mean()), "std": float(null.std()), "min": float(null.min()),
                         "max": float(null.max()), "values": [float(v) for v in null]}}


@dataclass(frozen=True)
class DriftResult:
    results: tuple[DistanceResult, ...]
    reference_rows: int  # used (after subsampling)
    incoming_rows: int
    reference_total: int
    incoming_total: int
    config: DriftConfig

    def to_dict(self) -> dict:
        return {"reference_rows": self.reference_rows, "incoming_rows": self.incoming_rows,
                "reference_total": self.reference_total, "incoming_total": self.incoming_total,
                "config": {**asdict(self.config), "distances": list(self.config.distances)},
                "distances": {result.distance: result.to_dict() for result in self.results}}


def subsample(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` rows, drawn without replacement in their original order, as float64."""
    if len(rows) <= limit:
        return np.asarray(rows, dtype=np.float64)
    return np.asarray(rows[np.sort(rng.choice(len(rows), limit, replace=False))], dtype=np.float64)


def permutation_null(split: Split, reference_rows: int, incoming_rows: int, permutations: int,
                     rng: np.random.Generator, on_draw: Callable[[], None] = lambda: None) -> np.ndarray:
    """The distance of ``permutations`` random splits of the pooled rows into sets of the two sizes."""
    total = reference_rows + incoming_rows
    null = np.empty(permutations)
    for draw in range(permutations):
        order = rng.permutation(total)
        null[draw] = split(order[:reference_rows], order[reference_rows:])
        on_draw()
    return null


def judge(distance: str, value: float, null: np.ndarray, quantile: float) -> DistanceResult:
    return DistanceResult(distance, float(value), float(np.quantile(null, quantile)),
                          float((1 + np.sum(null >= value)) / (1 + null.size)), float(100 * np.mean(null < value)),
                          tuple(float(v) for v in null))


def drift_test(reference: np.ndarray, incoming: np.ndarray, cfg: DriftConfig = DriftConfig(),
               on_draw: Callable[[], None] = lambda: None) -> DriftResult:
    """Every distance of ``cfg`` between the two ``[n, D]`` sets, each with its permutation null
    (``on_draw`` is called after each of its ``len(distances) * permutations`` draws: a progress bar)."""
    if reference.ndim != 2 or incoming.ndim != 2 or reference.shape[1] != incoming.shape[1]:
        raise ValueError(f"drift: embeddings of different shapes: reference {reference.shape}, incoming "
                         f"{incoming.shape} (the same model must embed both)")
    for name, rows in (("reference", reference), ("incoming", incoming)):
        if len(rows) < 2:
            raise ValueError(f"drift: {name}: {len(rows)} embedding(s); at least 2 are needed")
    rng = np.random.default_rng(cfg.seed)
    ref = subsample(reference, cfg.max_rows_per_set, rng)
    inc = subsample(incoming, cfg.max_rows_per_set, rng)
    for name, rows in (("reference", ref), ("incoming", inc)):
        if not np.isfinite(rows).all():
            broken = int(np.sum(~np.isfinite(rows).all(axis=1)))
            raise ValueError(f"drift: {name}: {broken} embedding(s) hold NaN or inf")
    pooled = np.concatenate([ref, inc])
    observed = (np.arange(len(ref)), np.arange(len(ref), len(pooled)))
    results = []
    for name in cfg.distances:
        split = _prepared(name, pooled, cfg)
        # every distance is judged on the same splits: a generator of its own from the same seed
        null = permutation_null(split, len(ref), len(inc), cfg.permutations, np.random.default_rng(cfg.seed + 1),
                                on_draw)
        results.append(judge(name, split(*observed), null, cfg.quantile))
    return DriftResult(tuple(results), len(ref), len(inc), len(reference), len(incoming), cfg)


# ------------------------------------------------------------------ a fixed reference (serving)


class SlicedReference:
    """A reference set projected once on fixed directions: the sliced W1 of a window of new embeddings
    against it then costs one ``[n, D] x [D, P]`` product and a sort (what a service recomputes)."""

    def __init__(self, reference: np.ndarray, projections: int = 64, seed: int = 0):
        self.dim = int(reference.shape[1])
        self.rows = int(reference.shape[0])
        self.directions = unit_directions(self.dim, projections, seed)
        self.projected = project(reference, self.directions)
        self.seed = seed

    def w1(self, window: np.ndarray) -> float:
        return sliced_w1_projected(self.projected, project(window, self.directions))

    def null_threshold(self, window_rows: int, draws: int = 200, quantile: float = 0.95) -> float | None:
        """The ``quantile`` of the W1 between ``window_rows`` reference rows drawn at random and the rest: the
        value a full window of data like the reference stays below. None when the reference holds fewer
        than ``2 * window_rows`` rows (its rest would be a poor stand-in for the whole)."""
        if self.rows < 2 * window_rows:
            return None
        split = lambda ref, inc: sliced_w1_projected(self.projected[:, ref], self.projected[:, inc])  # noqa: E731
        null = permutation_null(split, self.rows - window_rows, window_rows, draws, np.random.default_rng(self.seed))
        return float(np.quantile(null, quantile))
