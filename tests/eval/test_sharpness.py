"""m-sharpness: the analytic value on a quadratic loss, a textbook reference on the tiny detector,
nested subsets, rank correlations, and both CLI commands on real shards."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posttrain.cli import main
from posttrain.eval.sharpness import (SharpnessConfig, batch_sharpness, catalog, group_of, load_batch, measure_sets,
                                      nested_subsets, rank_correlation)


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w + b^T w over two parameters, one named *weight* (ASAM scales it) one *bias*."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.weight = nn.Parameter(w[:3].clone())
        self.bias = nn.Parameter(w[3:].clone())

    def loss(self) -> torch.Tensor:
        w = torch.cat([self.weight, self.bias])
        return 0.5 * w @ self.a @ w + self.b @ w


def _quadratic(seed=0):
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(5, dtype=torch.float64)
    return a, torch.randn(5, generator=generator, dtype=torch.float64), torch.randn(5, generator=generator,
                                                                                      dtype=torch.float64)


@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_sharpness_of_a_quadratic_is_analytic(rho):
    a, b, w = _quadratic()
    model = Quadratic(a, b, w)
    value, base = batch_sharpness(model, model.loss, rho)
    g = a @ w + b
    norm = g.norm()
    expected = rho * norm + 0.5 * rho**2 * (g @ a @ g) / norm**2
    assert value == pytest.approx(float(expected), rel=1e-9)
    assert base == pytest.approx(float(0.5 * w @ a @ w + b @ w), rel=1e-12)
    assert torch.equal(torch.cat([model.weight, model.bias]).detach(), w)  # restored exactly
    assert model.weight.grad is None


def test_adaptive_sharpness_of_a_quadratic_is_analytic():
    a, b, w = _quadratic(1)
    model = Quadratic(a, b, w)
    rho, eta = 0.2, 0.01
    value, _ = batch_sharpness(model, model.loss, rho, adaptive=True, eta=eta)
    g = a @ w + b
    t = torch.cat([w[:3].abs() + eta, torch.ones(2, dtype=torch.float64)])  # T on the weight, 1 on the bias
    e = rho * t**2 * g / (t * g).norm()
    expected = g @ e + 0.5 * e @ a @ e
    assert value == pytest.approx(float(expected), rel=1e-9)


def test_rank_correlation_of_a_monotone_relation():
    x = np.linspace(0.1, 2.0, 8)
    up = rank_correlation(x, np.exp(x) / 10)
    assert up.spearman == pytest.approx(1.0) and up.kendall == pytest.approx(1.0)
    assert up.spearman_p < 0.01 and up.kendall_p < 0.01
    down = rank_correlation(x, 1 / x)
    assert down.spearman == pytest.approx(-1.0) and down.kendall == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3"):
        rank_correlation([1, 2], [3, 4])


def test_nested_subsets_grow_and_keep_bona_fide(shard_dir):
    entries = catalog(shard_dir)
    assert len(entries) == 12
    by_attack = nested_subsets(entries, "attack", steps=None, seed=0)
    bona = {e.id for e in entries if e.label == 1}
    assert [s.name for s in by_attack] == ["attack:1", "attack:2"]
    for small, large in zip(by_attack, by_attack[1:]):
        assert {e.id for e in small.entries} < {e.id for e in large.entries}
    assert all(bona <= {e.id for e in s.entries} for s in by_attack)
    assert {e.id for e in by_attack[-1].entries} == {e.id for e in entries}
    by_language = nested_subsets(entries, "language", steps=None, seed=3)
    assert [len(s.groups) for s in by_language] == [1, 2, 3]
    for subset in by_language:
        assert {group_of(e, "language") for e in subset.entries} == set(subset.groups)


def _tiny_detector():
    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    torch.manual_seed(0)
    return build_detector(ModelConfig(preset="tiny")).eval()


def test_measure_sets_matches_a_textbook_reference(shard_dir):
    entries = catalog(shard_dir)
    model = _tiny_detector()
    cfg = SharpnessConfig(rho=0.05, batch_size=len(entries), max_seconds=1.0)  # one batch: B = the whole set
    result = measure_sets(model, {"all": entries}, cfg, device=torch.device("cpu"))["all"]

    reference = copy.deepcopy(model)
    batch, skipped = load_batch(entries, max_seconds=1.0, eps=model.input_eps)
    assert skipped == []
    loss = F.cross_entropy(reference(batch.waveforms, batch.lengths), batch.labels)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(reference.parameters(), grads):
            p.add_(0.05 * g / norm)
        perturbed = F.cross_entropy(reference(batch.waveforms, batch.lengths), batch.labels)
    assert result.samples == 12 and result.batches == 1 and result.skipped == 0
    assert result.sharpness == pytest.approx(float(perturbed - loss.detach()), rel=1e-4, abs=1e-7)
    assert result.sharpness > 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), _tiny_detector().parameters()))


def test_sharpness_cli_overall_and_per_group(shard_dir, tmp_path):
    out = tmp_path / "sharp"
    assert main(["sharpness", "--random-preset", "tiny", "--shards", str(shard_dir), "--by", "language",
                 "--batch-size", "4", "--max-seconds", "0.5", "--no-progress", "--out", str(out)]) == 0
    document = json.loads((out / "sharpness.json").read_text())
    sets = document["sets"]
    assert set(sets) == {"all", "language=de", "language=en", "language=zh"}
    assert sets["all"]["samples"] == 12 and sets["all"]["batches"] == 3
    assert sum(sets[f"language={x}"]["samples"] for x in ("de", "en", "zh")) == 12
    assert all(np.isfinite(s["sharpness"]) for s in sets.values())
    assert "language=zh" in (out / "sharpness.txt").read_text()


def test_sharpness_correlate_cli(shard_dir, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "corr"
    assert main(["sharpness", "correlate", "--random-preset", "tiny", "--shards", str(shard_dir), "--by", "language",
                 "--batch-size", "4", "--max-seconds", "0.5", "--no-progress", "--out", str(out)]) == 0
    document = json.loads((out / "correlation.json").read_text())
    assert [row["name"] for row in document["subsets"]] == ["language:1", "language:2", "language:3"]
    assert [row["samples"] for row in document["subsets"]][-1] == 12
    correlation = document["correlation"]
    assert correlation["points"] == 3 and -1 <= correlation["spearman"] <= 1 and -1 <= correlation["kendall"] <= 1
    assert mpimg.imread(out / "correlation.png").shape[2] in (3, 4)
    assert main(["sharpness", "correlate", "--random-preset", "tiny", "--shards", str(shard_dir), "--by", "attack",
                 "--out", str(tmp_path / "bad")]) == 2  # two attacks: too few subsets, a clear error
