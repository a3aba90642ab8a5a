"""Neural-collapse selection: nearest samples, fake clusters, exact budgets, streaming statistics, NC1."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import write_embedding_set

from posttrain.select.nc import (SelectionOptions, allocate, group_means, merge_selections, nc1, select_source,
                                 totals_by)

DIM = 8
FAKE_SIZES = (300, 120, 40)  # three generators of different sizes: 20 % of each is a whole number
REAL_SIZE = 200


class ChunkGuard:
    """An embedding matrix that refuses any read of more than ``chunk_rows`` rows: streaming or bust."""

    def __init__(self, array: np.ndarray, chunk_rows: int):
        self.array, self.chunk_rows, self.reads = array, chunk_rows, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, rows):
        count = len(np.arange(len(self.array))[rows])
        assert count <= self.chunk_rows, f"read {count} rows at once (chunk_rows {self.chunk_rows})"
        self.reads += 1
        return self.array[rows]


def blobs(seed: int = 0, fake_sizes=FAKE_SIZES, real_size=REAL_SIZE, corpus: str = "SYN"):
    """1 real Gaussian blob and one fake blob per size, along distinct axes (far apart in angle and
    distance); rows shuffled so no group is contiguous. Returns (embeddings, meta, blob of each row)."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(DIM)[: 1 + len(fake_sizes)]
    sizes = (real_size, *fake_sizes)
    blob = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[blob] + rng.standard_normal((len(blob), DIM))
    order = rng.permutation(len(blob))
    points, blob = points[order].astype(np.float32), blob[order]
    seconds = rng.uniform(0.5, 4.0, len(blob))
    meta = [{"id": f"{corpus}-{i:05d}", "label": "real" if b == 0 else "fake", "corpus": corpus,
             "attack": "-" if b == 0 else f"A{b:02d}", "seconds": float(s)}
            for i, (b, s) in enumerate(zip(blob, seconds))]
    return points, meta, blob


def nearest(points: np.ndarray, members: np.ndarray, count: int, distance: str) -> set[int]:
    """Brute force: the ``count`` members nearest their mean (ties by row)."""
    vectors = points[members].astype(np.float64)
    if distance == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        centre = vectors.mean(0)
        gaps = 1 - vectors @ (centre / np.linalg.norm(centre))
    else:
        gaps = np.linalg.norm(vectors - vectors.mean(0), axis=1)
    return set(members[np.lexsort((members, gaps))[:count]].tolist())


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_keeps_exactly_the_nearest_of_the_real_class_and_of_every_fake_cluster(distance):
    points, meta, blob = blobs()
    guarded = ChunkGuard(points, chunk_rows=64)
    options = SelectionOptions(budget=0.2, distance=distance, fake_clusters=3, chunk_rows=64, seed=0)
    selection = select_source(guarded, meta, options)
    expected = set()
    for index, size in enumerate((REAL_SIZE, *FAKE_SIZES)):
        expected |= nearest(points, np.flatnonzero(blob == index), size // 5, distance)
    assert set(selection.kept_rows.tolist()) == expected
    fake = next(group for group in selection.groups if group.label == "fake")
    assert sorted(cluster["samples"] for cluster in fake.clusters) == sorted(FAKE_SIZES)
    assert sorted(cluster["kept"] for cluster in fake.clusters) == sorted(size // 5 for size in FAKE_SIZES)
    assert guarded.reads > 2 * len(points) / 64  # really streamed: many bounded reads


def test_a_tiny_fake_cluster_is_still_represented_and_the_budget_is_exact():
    # the 8-sample generator's share of a 2.5 % budget is 0.2 samples
    points, meta, blob = blobs(fake_sizes=(300, 120, 8), real_size=57)
    options = SelectionOptions(budget=0.025, fake_clusters=3, chunk_rows=500)
    selection = select_source(points, meta, options)
    kept = selection.kept_rows
    for index in range(4):
        assert np.isin(np.flatnonzero(blob == index), kept).any(), f"blob {index} lost"
    fake = next(group for group in selection.groups if group.label == "fake")
    assert sorted(cluster["samples"] for cluster in fake.clusters) == [8, 120, 300]
    # Adams: 11 samples over quotas 7.5, 3, 0.2 are ceil(l * quota) with l in (2/3, 14/15]: 7, 3, 1
    assert sorted(cluster["kept"] for cluster in fake.clusters) == [1, 3, 7]
    for label, size in (("real", 57), ("fake", 428)):
        group = next(group for group in selection.groups if group.label == label)
        assert group.kept_samples == math.ceil(0.025 * size) == np.sum((blob[kept] == 0) == (label == "real"))


def test_seconds_budget_is_reached_within_one_sample_per_class():
    points, meta, blob = blobs(seed=3)
    seconds = np.array([item["seconds"] for item in meta])
    selection = select_source(points, meta, SelectionOptions(budget=0.3, budget_unit="seconds", fake_clusters=3,
                                                             chunk_rows=128))
    for group in selection.groups:
        members = np.flatnonzero((blob == 0) == (group.label == "real"))
        kept = np.intersect1d(members, selection.kept_rows)
        target = 0.3 * seconds[members].sum()
        assert group.seconds == pytest.approx(seconds[members].sum())
        assert group.kept_seconds == pytest.approx(seconds[kept].sum())
        assert target <= seconds[kept].sum() < target + seconds[kept].max()


def adams_reference(clusters, distances, weights, target) -> set[int]:
    """Sequential Adams apportionment: each cluster's nearest first, then always the cluster furthest
    below its quota (lowest kept weight / quota; ties to the lower cluster id) takes its next sample."""
    ranked = {c: sorted(np.flatnonzero(clusters == c), key=lambda i: (distances[i], i)) for c in np.unique(clusters)}
    quota = {c: target * weights[clusters == c].sum() / weights.sum() for c in ranked}
    taken = {c: 1 for c in ranked}
    kept_weight = {c: weights[ranked[c][0]] for c in ranked}
    total = sum(kept_weight.values())
    while total < target * (1 - 1e-9):
        open_clusters = [c for c in ranked if taken[c] < len(ranked[c])]
        c = min(open_clusters, key=lambda c: (kept_weight[c] / quota[c], c))
        sample = ranked[c][taken[c]]
        taken[c] += 1
        kept_weight[c] += weights[sample]
        total += weights[sample]
    return {i for c in ranked for i in ranked[c][: taken[c]]}


@pytest.mark.parametrize("seed", range(5))
def test_allocate_matches_a_sequential_adams_apportionment(seed):
    rng = np.random.default_rng(seed)
    count = 200
    clusters = rng.choice(5, size=count, p=[0.5, 0.25, 0.15, 0.08, 0.02])
    distances, weights = rng.random(count), rng.uniform(0.2, 3.0, count)
    target = rng.uniform(0.05, 0.6) * weights.sum()
    kept = allocate(clusters, distances, weights, target)
    assert set(kept.tolist()) == adams_reference(clusters, distances, weights, target)
    assert set(np.unique(clusters)) <= set(clusters[kept].tolist())
    assert target <= weights[kept].sum() < target + weights[kept].max()


def test_every_cluster_keeps_its_nearest_even_past_a_tiny_seconds_budget():
    clusters, distances = np.array([0, 0, 1, 1, 1]), np.array([0.5, 0.1, 0.3, 0.2, 0.9])
    weights = np.array([4.0, 3.0, 1.0, 2.0, 1.0])
    np.testing.assert_array_equal(allocate(clusters, distances, weights, target=2.0), [1, 3])
    # quotas 3.5 and 2: after the nearest two (3 s + 2 s), cluster 0 is the less full (3/3.5 < 2/2)
    np.testing.assert_array_equal(allocate(clusters, distances, weights, target=5.5), [0, 1, 3])


def test_selection_is_deterministic_given_the_seed():
    points, meta, _ = blobs(seed=5)
    # overlapping fakes: k-means has real choices to make, which only the seed may fix
    points[points[:, 0] < 5] += np.random.default_rng(1).standard_normal((int((points[:, 0] < 5).sum()), DIM)) * 4
    options = SelectionOptions(budget=0.25, fake_clusters=5, chunk_rows=100, seed=7)
    first, second = select_source(points, meta, options), select_source(points, meta, options)
    np.testing.assert_array_equal(first.kept_rows, second.kept_rows)
    assert first.groups == second.groups


def test_streamed_group_means_equal_numpy_on_a_float16_memmap(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "e.npy"
    np.save(path, rng.standard_normal((1000, 6)).astype(np.float16))
    array = np.load(path, mmap_mode="r")
    rows = np.sort(rng.choice(1000, 700, replace=False))
    groups = rng.integers(0, 4, 700)
    for distance in ("euclidean", "cosine"):
        means, counts = group_means(array, rows, groups, 5, chunk_rows=33, distance=distance)
        vectors = np.asarray(array, dtype=np.float64)[rows]
        if distance == "cosine":
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for g in range(4):
            np.testing.assert_allclose(means[g], vectors[groups == g].mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(counts, [np.sum(groups == g) for g in range(5)])
        np.testing.assert_array_equal(means[4], 0)


def nc1_reference(points: np.ndarray, classes: np.ndarray) -> float:
    """Papyan et al.: tr(S_W pinv(S_B)) / C from full covariance matrices, in memory."""
    present = np.unique(classes)
    means = np.stack([points[classes == c].mean(0) for c in present])
    centred = points - means[np.searchsorted(present, classes)]
    within = centred.T @ centred / len(points)
    between_centred = means - points.mean(0)
    between = between_centred.T @ between_centred / len(present)
    return float(np.trace(within @ np.linalg.pinv(between, rtol=1e-10, hermitian=True)) / len(present))


def test_nc1_is_zero_for_collapsed_classes_and_known_for_a_constructed_spread():
    centres = np.array([[3.0, 1, 0, 0], [-1.0, 2, 0, 1], [0.0, 0, 5, 0]])
    classes = np.repeat([0, 1, 2], [4, 7, 2])
    assert nc1(centres[classes], np.arange(13), classes, chunk_rows=3) == pytest.approx(0.0, abs=1e-20)
    # two classes at -a e0 and +a e0, each spread as mu +- sigma sqrt(D) e_k: S_W = sigma^2 I,
    # S_B = a^2 e0 e0^T, so NC1 = tr(S_W S_B^+) / 2 = sigma^2 / (2 a^2)
    a, sigma, dim = 2.0, 0.5, 5
    offsets = np.concatenate([np.eye(dim), -np.eye(dim)]) * sigma * math.sqrt(dim)
    points = np.concatenate([-a * np.eye(dim)[0] + offsets, a * np.eye(dim)[0] + offsets])
    classes = np.repeat([0, 1], 2 * dim)
    assert nc1(points, np.arange(len(points)), classes, chunk_rows=4) == pytest.approx(sigma**2 / (2 * a**2))
    assert math.isnan(nc1(points, np.arange(10), classes[:10]))  # one class: no between-class spread


@pytest.mark.parametrize("num_classes", [2, 3])
def test_streamed_nc1_equals_the_in_memory_formula(num_classes):
    rng = np.random.default_rng(num_classes)
    points = rng.standard_normal((900, 7)) + rng.standard_normal((num_classes, 7))[rng.integers(0, num_classes, 900)]
    classes = rng.choice(num_classes, 900, p=np.linspace(1, 2, num_classes) / np.linspace(1, 2, num_classes).sum())
    points += 3 * np.eye(7)[classes]
    rows = np.sort(rng.choice(900, 600, replace=False))
    assert nc1(points.astype(np.float32), rows, classes[rows], chunk_rows=50) == pytest.approx(
        nc1_reference(points.astype(np.float32).astype(np.float64)[rows], classes[rows]), rel=1e-9)


def test_selection_lowers_nc1_and_reports_it():
    points, meta, _ = blobs(seed=2)
    selection = select_source(points, meta, SelectionOptions(budget=0.2, fake_clusters=3, chunk_rows=100))
    classes = np.array([item["label"] == "real" for item in meta], dtype=np.int64)
    assert selection.nc1_before == pytest.approx(nc1_reference(points.astype(np.float64), classes), rel=1e-9)
    kept = selection.kept_rows
    assert selection.nc1_after == pytest.approx(nc1_reference(points.astype(np.float64)[kept], classes[kept]),
                                                rel=1e-9)
    assert selection.nc1_after < selection.nc1_before


def test_per_corpus_budget_and_merge_across_two_embedding_folders(tmp_path):
    from posttrain.select.embeddings import load_embeddings

    first_points, first_meta, _ = blobs(seed=0, fake_sizes=(60, 30), real_size=50, corpus="AAA")
    other_points, other_meta, _ = blobs(seed=1, fake_sizes=(40,), real_size=20, corpus="BBB")
    # model 1 embedded both corpora; model 2 embedded corpus AAA again (a different model: rotated space)
    write_embedding_set(tmp_path / "m1", np.concatenate([first_points, other_points]), first_meta + other_meta,
                        model={"name": "m1"})
    rotation, _ = np.linalg.qr(np.random.default_rng(9).standard_normal((DIM, DIM)))
    write_embedding_set(tmp_path / "m2", (first_points @ rotation).astype(np.float16), first_meta)
    options = SelectionOptions(budget=0.1, fake_clusters=2, per="corpus", chunk_rows=32, distance="euclidean")
    loaded = [load_embeddings(tmp_path / name) for name in ("m1", "m2")]
    selections = [select_source(array, meta, options, name=name) for (array, meta), name in zip(loaded, ("m1", "m2"))]

    groups = {(g.corpus, g.label): (g.samples, g.kept_samples) for g in selections[0].groups}
    assert groups == {("AAA", "real"): (50, 5), ("AAA", "fake"): (90, 9), ("BBB", "real"): (20, 2),
                      ("BBB", "fake"): (40, 4)}
    selected_by = merge_selections(selections, [meta for _, meta in loaded])
    ids = [{loaded[i][1][row]["id"] for row in selection.kept_rows} for i, selection in enumerate(selections)]
    assert set(selected_by) == ids[0] | ids[1]
    assert {i for i, n in selected_by.items() if n == 2} == ids[0] & ids[1]
    assert len(ids[1]) == 14 and ids[1] <= {item["id"] for item in first_meta}

    totals = totals_by({item["id"]: item for item in first_meta + other_meta}, set(selected_by))
    assert totals["all"]["all"]["kept_samples"] == len(selected_by)
    assert sum(entry["kept_samples"] for entry in totals["corpus"].values()) == len(selected_by)
    assert totals["corpus"]["BBB"] == pytest.approx(
        {"samples": 60, "hours": sum(item["seconds"] for item in other_meta) / 3600, "kept_samples": 6,
         "kept_hours": sum(item["seconds"] for item in other_meta if item["id"] in ids[0]) / 3600})


def test_bad_labels_and_options_are_named():
    points, meta, _ = blobs(fake_sizes=(5,), real_size=5)
    meta[3] = {**meta[3], "label": "spoof"}
    with pytest.raises(ValueError, match=r"row 3 .*'spoof'"):
        select_source(points, meta, SelectionOptions())
    with pytest.raises(ValueError, match="budget"):
        SelectionOptions(budget=1.5)
    meta[3] = {**meta[3], "label": "real", "seconds": None}
    with pytest.raises(ValueError, match=r"row 3 .*seconds"):
        select_source(points, meta, SelectionOptions(budget_unit="seconds"))
