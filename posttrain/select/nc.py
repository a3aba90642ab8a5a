"""Neural-collapse data selection (Yousif et al., arXiv 2404.13008): keep the samples most typical of
their class, a smaller training set meant to generalise as well as the full one.

Method
    Each embeddings folder holds one source model's pooled embeddings of its own training data. Within
    a source the samples are grouped by label (and by corpus with ``per="corpus"``). A real group keeps
    its samples nearest the group mean. A fake group is multi-modal (one mode per generator), so it is
    first clustered with k-means (scikit-learn, seeded: ``KMeans`` on one chunk of random rows for the
    initial centres, then ``MiniBatchKMeans.partial_fit`` over all rows chunk by chunk) and keeps the
    samples nearest each cluster's mean; the group's budget is split over its clusters in proportion
    to their sizes by Adams' apportionment (the smallest-divisor method: every non-empty cluster keeps
    at least one sample). Distances are cosine (on L2-normalised embeddings, whose means
    are then the cluster directions) or euclidean (raw embeddings).

Budget
    A fraction of each group's samples or audio seconds. Applying it per group (never to the pooled
    set) keeps the source's class balance, and its corpus balance with ``per="corpus"``. A group keeps
    the shortest run of its ranked samples that reaches ``budget * group total``, so it never falls
    short and overshoots by less than one sample. A fake group is cut into at most
    ``ceil(budget * n)`` clusters, so one sample per cluster fits a sample budget; with a seconds
    budget of only a few samples, keeping every cluster's nearest sample may overshoot further.

Merge
    The selected set is the union of the sources' selections. A sample chosen by several sources is
    kept once and costs the budget of every source that chose it (each source spends its own budget on
    its own data); ``selected_by`` counts how many sources chose each kept sample.

Scale
    The embedding matrix is never loaded whole: means, k-means, distances and NC1 stream over it in
    blocks of ``chunk_rows`` rows with float64 accumulators. Per-sample state is a few scalars (group,
    cluster, distance), so memory is ``O(chunk_rows * dim + samples)``.

NC1 (Papyan et al., 2020)
    ``NC1 = tr(S_W S_B^+) / C`` with ``S_W`` the within-class covariance averaged over all samples,
    ``S_B`` the covariance of the C class means around the global mean (averaged over classes) and
    ``+`` the pseudo-inverse; 0 when every class has collapsed to its mean.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from tqdm import tqdm

from posttrain.data.labels import LABELS

DISTANCES = ("cosine", "euclidean")
BUDGET_UNITS = ("samples", "seconds")
GROUPINGS = ("source", "corpus")
ALL_CORPORA = "*"  # the corpus of a group when groups span a whole source
# Relative tolerance of "the budget is reached": a budget of 0.2 * 100 samples is 20.000000000000004 in
# floating point, which must keep 20 samples, not 21.
BUDGET_TOLERANCE = 1e-9
KMEANS_INITS = 10  # k-means++ runs for the initial centres (scikit-learn's n_init), the best kept


@dataclass(frozen=True)
class SelectionOptions:
    budget: float = 0.2  # fraction of each group kept, in ``budget_unit``
    budget_unit: str = "samples"
    distance: str = "cosine"
    fake_clusters: int = 8  # k of the k-means on each fake group
    per: str = "source"  # "corpus": one group per (corpus, label) of a source
    seed: int = 0
    chunk_rows: int = 65_536  # embedding rows read at once
    kmeans_epochs: int = 5  # passes of partial_fit over a fake group

    def __post_init__(self) -> None:
        checks = {"budget": 0 < self.budget <= 1, "budget_unit": self.budget_unit in BUDGET_UNITS,
                  "distance": self.distance in DISTANCES, "fake_clusters": self.fake_clusters >= 1,
                  "per": self.per in GROUPINGS, "chunk_rows": self.chunk_rows >= self.fake_clusters,
                  "kmeans_epochs": self.kmeans_epochs >= 1}
        for option, ok in checks.items():
            if not ok:
                raise ValueError(f"selection option {option}={getattr(self, option)!r} is out of range "
                                 "(budget in (0, 1], chunk_rows >= fake_clusters)")


@dataclass
class GroupSelection:
    """What one (corpus, label) group of a source had and kept; ``clusters`` lists size/kept per cluster."""

    corpus: str
    label: str
    samples: int
    seconds: float
    kept_samples: int
    kept_seconds: float
    clusters: list[dict[str, int]]


@dataclass
class SourceSelection:
    """One embeddings set's selection: ``kept_rows`` are sorted row numbers of its matrix."""

    name: str
    kept_rows: np.ndarray
    groups: list[GroupSelection]
    nc1_before: float
    nc1_after: float
    model: dict[str, Any] = field(default_factory=dict)


# --- streaming primitives ---


def iter_blocks(embeddings: np.ndarray, rows: np.ndarray, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(offset into rows, float64 block of those rows)``; ``rows`` sorted keeps the memmap reads sequential."""
    for start in range(0, len(rows), chunk_rows):
        yield start, np.asarray(embeddings[rows[start:start + chunk_rows]], dtype=np.float64)


def _normalised(block: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.where(norms > 0, norms, 1.0)  # a zero vector stays zero: cosine distance 1 to all


def _in_space(block: np.ndarray, distance: str) -> np.ndarray:
    """Rows in the space the distance lives in: the unit sphere for cosine."""
    return _normalised(block) if distance == "cosine" else block


def group_means(embeddings: np.ndarray, rows: np.ndarray, groups: np.ndarray, num_groups: int, *,
                chunk_rows: int, distance: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """``(means [num_groups, dim] float64, counts [num_groups])`` of ``embeddings[rows]`` by ``groups``
    (one group id per row), streamed; the means of normalised rows for cosine; empty groups stay 0."""
    sums = np.zeros((num_groups, embeddings.shape[1]), dtype=np.float64)
    for start, block in iter_blocks(embeddings, rows, chunk_rows):
        np.add.at(sums, groups[start:start + len(block)], _in_space(block, distance))
    counts = np.bincount(groups, minlength=num_groups)
    return sums / np.maximum(counts, 1)[:, None], counts


def distances_to_means(embeddings: np.ndarray, rows: np.ndarray, groups: np.ndarray, means: np.ndarray, *,
                       distance: str, chunk_rows: int) -> np.ndarray:
    """Distance of each of ``embeddings[rows]`` to the mean of its group (cosine: ``1 - cos``)."""
    out = np.empty(len(rows), dtype=np.float64)
    centres = _normalised(means) if distance == "cosine" else means
    for start, block in iter_blocks(embeddings, rows, chunk_rows):
        block = _in_space(block, distance)
        own = centres[groups[start:start + len(block)]]
        if distance == "cosine":
            out[start:start + len(block)] = 1.0 - np.einsum("ij,ij->i", block, own)
        else:
            out[start:start + len(block)] = np.linalg.norm(block - own, axis=1)
    return out


def nc1(embeddings: np.ndarray, rows: np.ndarray, classes: np.ndarray, *, chunk_rows: int = 65_536) -> float:
    """NC1 of ``embeddings[rows]`` with one class id per row (NaN with fewer than two classes).

    ``S_B = V diag(s^2 / C) V^T`` from the thin SVD of the centred class means, so
    ``tr(S_W S_B^+) / C = mean_i ||diag(1/s) V^T (h_i - mu_c(i))||^2``: one streamed pass projecting
    onto at most ``C - 1`` directions, never a ``dim x dim`` matrix.
    """
    num_classes = int(classes.max()) + 1 if len(classes) else 0
    means, counts = group_means(embeddings, rows, classes, num_classes, chunk_rows=chunk_rows)
    present = counts > 0
    if present.sum() < 2:
        return math.nan
    global_mean = counts[present] @ means[present] / counts.sum()
    _, singular, directions = np.linalg.svd(means[present] - global_mean, full_matrices=False)
    # numpy's matrix_rank cut-off: the centred means have rank C - 1, the last value is rounding noise
    keep = singular > singular[0] * max(means.shape) * np.finfo(np.float64).eps
    projection = directions[keep].T / singular[keep]  # [dim, rank]
    total = 0.0
    for start, block in iter_blocks(embeddings, rows, chunk_rows):
        centred = block - means[classes[start:start + len(block)]]
        total += float(np.square(centred @ projection).sum())
    return total / counts.sum()


# --- clustering and budget ---


def cluster_rows(embeddings: np.ndarray, rows: np.ndarray, num_clusters: int, *, distance: str, seed: int,
                 chunk_rows: int, epochs: int) -> np.ndarray:
    """k-means cluster id of each of ``embeddings[rows]``: seeded on a sample, refined on every chunk.

    The centres start from a full ``KMeans`` (best of ``KMEANS_INITS`` k-means++ runs) on one chunk of
    randomly drawn rows: a single k-means++ draw, which is all ``partial_fit`` does, often splits a big
    generator and merges two small ones. ``MiniBatchKMeans.partial_fit`` then refines them over seeded
    shuffles of all rows, one chunk at a time, so memory stays bounded however large the group.
    """
    rng = np.random.default_rng(seed)

    def shuffled_chunks() -> Iterator[np.ndarray]:
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), chunk_rows):
            chunk = np.sort(rows[order[start:start + chunk_rows]])
            yield _in_space(np.asarray(embeddings[chunk], dtype=np.float64), distance)

    initial = KMeans(n_clusters=num_clusters, n_init=KMEANS_INITS, random_state=seed).fit(next(shuffled_chunks()))
    # reassignment_ratio=0: scikit-learn's default moves the centres of clusters with few samples to
    # random points, which erases exactly the rare generators the clustering is there to keep.
    kmeans = MiniBatchKMeans(n_clusters=num_clusters, init=initial.cluster_centers_, n_init=1, random_state=seed,
                             compute_labels=False, reassignment_ratio=0.0)
    for _ in range(epochs):
        for block in shuffled_chunks():
            kmeans.partial_fit(block)
    assignment = np.empty(len(rows), dtype=np.int64)
    for start, block in iter_blocks(embeddings, rows, chunk_rows):
        assignment[start:start + len(block)] = kmeans.predict(_in_space(block, distance))
    return assignment


def budget_count(num_samples: int, budget: float) -> int:
    """Samples a fraction ``budget`` of ``num_samples`` keeps: the least count reaching it."""
    return min(num_samples, math.ceil(budget * num_samples * (1 - BUDGET_TOLERANCE)))


def allocate(clusters: np.ndarray, distances: np.ndarray, weights: np.ndarray, target: float) -> np.ndarray:
    """Sorted positions of the kept samples: the nearest of each cluster, ``target`` weight in all.

    Adams' apportionment: a cluster's quota is ``target * its weight / total weight``; its samples enter
    nearest first, ranked by how full the cluster already is (weight kept before them / quota). Every
    non-empty cluster's nearest sample comes first (fullness 0), then the emptiest cluster's next one,
    until the kept weight reaches ``target`` (which it overshoots by less than one sample). Only when
    the clusters' nearest samples alone outweigh ``target`` (a budget of a few long samples) does it
    overshoot further: every cluster keeps its nearest sample.
    """
    count = len(distances)
    order = np.lexsort((np.arange(count), distances, clusters))  # by cluster, nearest first
    sorted_clusters, sorted_weights = clusters[order], weights[order]
    weight_before = np.cumsum(sorted_weights) - sorted_weights
    first_of_cluster = np.searchsorted(sorted_clusters, sorted_clusters, side="left")
    within_before = weight_before - weight_before[first_of_cluster]
    totals = np.bincount(clusters, weights=weights)
    quota = target * totals[sorted_clusters] / totals.sum()
    fullness = within_before / np.maximum(quota, np.finfo(np.float64).tiny)
    entering = np.lexsort((np.arange(count), fullness))  # ties: cluster id, then rank (already the order)
    reached = np.cumsum(sorted_weights[entering])
    kept = min(count, int(np.searchsorted(reached, target * (1 - BUDGET_TOLERANCE), side="left")) + 1)
    kept = max(kept, len(np.unique(clusters)))  # every cluster's nearest, even past a tiny seconds budget
    return np.sort(order[entering[:kept]])


# --- selection of one source and merging ---


def _group_keys(meta: Sequence[dict[str, Any]], per: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Sorted ``(corpus, label)`` keys and each row's key index."""
    keys: list[tuple[str, str]] = []
    for row, item in enumerate(meta):
        label = item.get("label")
        if label not in LABELS:
            raise ValueError(f"embedding row {row} ({item.get('id')!r}): label {label!r} is not one of {LABELS}")
        keys.append((str(item.get("corpus", "-")) if per == "corpus" else ALL_CORPORA, label))
    unique = sorted(set(keys))
    lookup = {key: index for index, key in enumerate(unique)}
    return unique, np.fromiter((lookup[key] for key in keys), dtype=np.int64, count=len(keys))


def sample_weights(meta: Sequence[dict[str, Any]], unit: str) -> np.ndarray:
    """What one sample costs of the budget: 1, or its seconds (the ``seconds`` of the embedding metadata)."""
    if unit == "samples":
        return np.ones(len(meta), dtype=np.float64)
    weights = np.empty(len(meta), dtype=np.float64)
    for row, item in enumerate(meta):
        seconds = item.get("seconds")
        if not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f"embedding row {row} ({item.get('id')!r}): seconds {seconds!r} is not a positive "
                             "number (needed by budget_unit='seconds')")
        weights[row] = seconds
    return weights


def select_group(embeddings: np.ndarray, rows: np.ndarray, weights: np.ndarray, num_clusters: int,
                 options: SelectionOptions) -> tuple[np.ndarray, np.ndarray]:
    """``(kept rows, cluster id of every row)`` of one group; ``num_clusters`` 1 = nearest the group mean."""
    chunk_rows, distance = options.chunk_rows, options.distance
    clusters = min(num_clusters, budget_count(len(rows), options.budget))
    if clusters > 1:
        assignment = cluster_rows(embeddings, rows, clusters, distance=distance, seed=options.seed,
                                  chunk_rows=chunk_rows, epochs=options.kmeans_epochs)
    else:
        assignment = np.zeros(len(rows), dtype=np.int64)
    means, _ = group_means(embeddings, rows, assignment, clusters, chunk_rows=chunk_rows, distance=distance)
    distances = distances_to_means(embeddings, rows, assignment, means, distance=distance, chunk_rows=chunk_rows)
    kept = allocate(assignment, distances, weights, options.budget * float(weights.sum()))
    return rows[kept], assignment


def select_source(embeddings: np.ndarray, meta: Sequence[dict[str, Any]], options: SelectionOptions, *,
                  name: str = "", model: dict[str, Any] | None = None) -> SourceSelection:
    """Select from one source model's embeddings (``embeddings[i]`` described by ``meta[i]``)."""
    if len(meta) != len(embeddings):
        raise ValueError(f"{name}: {len(embeddings)} embedding rows but {len(meta)} metadata rows")
    keys, group_of_row = _group_keys(meta, options.per)
    weights = sample_weights(meta, options.budget_unit)
    seconds = np.array([float(item.get("seconds") or 0.0) for item in meta])
    kept_parts, groups = [], []
    for index, (corpus, label) in enumerate(tqdm(keys, desc=f"select {name}", unit="group", leave=False)):
        rows = np.flatnonzero(group_of_row == index)
        num_clusters = options.fake_clusters if label == "fake" else 1
        kept, assignment = select_group(embeddings, rows, weights[rows], num_clusters, options)
        kept_parts.append(kept)
        kept_assignment = assignment[np.searchsorted(rows, kept)]
        sizes, kept_sizes = np.bincount(assignment), np.bincount(kept_assignment, minlength=assignment.max() + 1)
        groups.append(GroupSelection(
            corpus=corpus, label=label, samples=len(rows), seconds=float(seconds[rows].sum()),
            kept_samples=len(kept), kept_seconds=float(seconds[kept].sum()),
            clusters=[{"samples": int(size), "kept": int(kept_size)}
                      for size, kept_size in zip(sizes, kept_sizes) if size > 0]))
    kept_rows = np.sort(np.concatenate(kept_parts)) if kept_parts else np.empty(0, dtype=np.int64)
    classes = np.array([LABELS.index(item["label"]) for item in meta], dtype=np.int64)
    all_rows = np.arange(len(meta))
    return SourceSelection(
        name=name, kept_rows=kept_rows, groups=groups, model=dict(model or {}),
        nc1_before=nc1(embeddings, all_rows, classes, chunk_rows=options.chunk_rows),
        nc1_after=nc1(embeddings, kept_rows, classes[kept_rows], chunk_rows=options.chunk_rows))


def merge_selections(selections: Sequence[SourceSelection],
                     metas: Sequence[Sequence[dict[str, Any]]]) -> dict[str, int]:
    """Union of the sources' kept ids -> how many sources selected each (in first-selected order)."""
    selected_by: Counter[str] = Counter()
    for selection, meta in zip(selections, metas):
        selected_by.update(list(dict.fromkeys(meta[row]["id"] for row in selection.kept_rows.tolist())))
    return dict(selected_by)


def totals_by(records: dict[str, dict[str, Any]], kept_ids: set[str],
              groups: Sequence[str] = ("corpus", "label", "attack")) -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {value: {samples, hours, kept_samples, kept_hours}}}`` over ``records`` (id -> metadata)."""
    totals: dict[str, dict[str, dict[str, float]]] = {group: {} for group in ("all", *groups)}
    for sample_id, item in records.items():
        kept = sample_id in kept_ids
        hours = float(item.get("seconds") or 0.0) / 3600
        for group in ("all", *groups):
            value = "all" if group == "all" else str(item.get(group, "-"))
            entry = totals[group].setdefault(value, {"samples": 0, "hours": 0.0, "kept_samples": 0,
                                                     "kept_hours": 0.0})
            entry["samples"] += 1
            entry["hours"] += hours
            entry["kept_samples"] += int(kept)
            entry["kept_hours"] += hours if kept else 0.0
    return {group: dict(sorted(values.items())) for group, values in totals.items()}
