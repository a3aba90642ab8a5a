"""Gradient alignment on lists of (sharded) gradient tensors vs full-vector references."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.optimize import minimize_scalar

from posttrain.config import DualPathConfig
from posttrain.dist import free_port
from posttrain.train.align import GradientAligner, cagrad_weight, combine_, partial_products

SHAPES = [(6, 5), (7,), (2, 3, 4), (1,)]
EPS = 1e-8


# ------------------------------------------------------ references on full flat vectors (float64)


def ref_pcgrad(gc, ga):
    pc_c, pc_a = gc.clone(), ga.clone()
    if torch.dot(gc, ga) < 0:
        pc_c = gc - torch.dot(gc, ga) / ga.norm() ** 2 * ga
        pc_a = ga - torch.dot(ga, gc) / gc.norm() ** 2 * gc
    return (pc_c + pc_a) / 2


class RefGradVac:
    """Two tasks, one EMA target per ordered pair (i, j), as in the DPDA code."""

    def __init__(self, beta=0.5, positive_only=True):
        self.targets = torch.zeros(2, 2, dtype=torch.float64)
        self.beta = beta
        self.positive_only = positive_only

    def __call__(self, gc, ga):
        grads = [gc, ga]
        out = [gc.clone(), ga.clone()]
        for i, j in ((0, 1), (1, 0)):
            rho = torch.dot(out[i], grads[j]) / (out[i].norm() * grads[j].norm() + EPS)
            phi = self.targets[i, j]
            if rho < phi:
                w = out[i].norm() * (phi * (1 - rho ** 2).sqrt() - rho * (1 - phi ** 2).sqrt()) / (
                    grads[j].norm() * (1 - phi ** 2).sqrt() + EPS)
                out[i] = out[i] + w * grads[j]
            if rho > 0 or not self.positive_only:
                self.targets[i, j] = (1 - self.beta) * phi + self.beta * rho
        return (out[0] + out[1]) / 2


def ref_cagrad(gc, ga, c=0.5):
    g0 = (gc + ga) / 2
    g0_norm = float(((gc.norm() ** 2 + ga.norm() ** 2 + 2 * torch.dot(gc, ga)) / 4 + EPS).sqrt())
    cs = c * g0_norm + EPS

    def objective(w):
        gw = w * gc + (1 - w) * ga
        return float(torch.dot(gw, g0) + cs * gw.norm())

    w = minimize_scalar(objective, bounds=(0, 1), method="bounded", options={"xatol": 1e-12}).x
    gw = w * gc + (1 - w) * ga
    return (g0 + cs / (gw.norm() + EPS) * gw) / (1 + c ** 2)


# ------------------------------------------------------------------------------------- helpers


def random_grads(seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def unflat(vector):
    out, start = [], 0
    for shape in SHAPES:
        n = int(np.prod(shape))
        out.append(vector[start:start + n].reshape(shape).clone())
        start += n
    return out


def pair_with_cosine(seed, cosine, norm_ratio=0.7):
    """Two flattened gradients (as lists) with a chosen cosine."""
    gc = flat(random_grads(seed))
    noise = flat(random_grads(seed + 1000))
    ortho = noise - torch.dot(noise, gc) / gc.norm() ** 2 * gc
    ga = cosine * gc / gc.norm() + np.sqrt(1 - cosine ** 2) * ortho / ortho.norm()
    return unflat(gc), unflat(norm_ratio * gc.norm() * ga)


def aligned(method, gc, ga, aligner=None, **kwargs):
    aligner = aligner or GradientAligner(method, **kwargs)
    ga = [t.clone() for t in ga]
    stats = aligner.align_([t.clone() for t in gc], ga, group=None)  # the dual-path step's call, one process
    return flat(ga), stats


REFERENCES = {"pcgrad": ref_pcgrad, "cagrad": ref_cagrad, "gradvac": lambda gc, ga: RefGradVac()(gc, ga),
              "sum": lambda gc, ga: gc + ga, "mean": lambda gc, ga: (gc + ga) / 2}


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize("seed", range(6))
def test_matches_full_vector_reference(method, seed):
    gc, ga = random_grads(seed), random_grads(seed + 100)
    if seed % 2:  # half the cases with a clear conflict
        ga = [a - 1.5 * c for a, c in zip(ga, gc)]
    result, stats = aligned(method, gc, ga)
    expected = REFERENCES[method](flat(gc), flat(ga))
    torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-6)
    assert stats.conflict == bool(torch.dot(flat(gc), flat(ga)) < 0)
    assert stats.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(flat(gc), flat(ga), dim=0)))


@pytest.mark.parametrize("method", ["pcgrad", "gradvac", "cagrad"])
def test_float32_and_into_aug(method):
    gc, ga = random_grads(3, torch.float32), random_grads(4, torch.float32)
    ga = [a - c for a, c in zip(ga, gc)]
    ga_work = [t.clone() for t in ga]
    GradientAligner(method).align_([t.clone() for t in gc], ga_work, group=None)
    expected = REFERENCES[method](flat(gc).double(), flat(ga).double())
    torch.testing.assert_close(flat(ga_work).double(), expected, atol=1e-5, rtol=1e-5)
    assert ga_work[0].dtype == torch.float32


def test_pcgrad_conflict_projects_and_result_conflicts_with_neither():
    gc, ga = pair_with_cosine(0, -0.6)
    result, stats = aligned("pcgrad", gc, ga)
    vc, va = flat(gc), flat(ga)
    dot, nc, na = torch.dot(vc, va), vc.norm() ** 2, va.norm() ** 2
    assert stats.conflict and stats.adjusted
    # Each projected gradient is orthogonal to the other original one, so the result's inner products
    # with the originals are half the squared norms of the projected gradients.
    torch.testing.assert_close(torch.dot(result, va), 0.5 * (na - dot ** 2 / nc))
    torch.testing.assert_close(torch.dot(result, vc), 0.5 * (nc - dot ** 2 / na))
    assert torch.dot(result, va) > 0 and torch.dot(result, vc) > 0
    assert not torch.allclose(result, (vc + va) / 2)


@pytest.mark.parametrize("method", ["pcgrad", "gradvac"])
def test_agreeing_gradients_are_averaged(method):
    gc, ga = pair_with_cosine(1, 0.3)
    result, stats = aligned(method, gc, ga)
    assert not stats.conflict and not stats.adjusted
    assert (stats.coef_clean, stats.coef_aug) == (0.5, 0.5)
    torch.testing.assert_close(result, (flat(gc) + flat(ga)) / 2, atol=0, rtol=0)


def test_cagrad_edge_cases_and_optimality():
    # Identical gradients: every w is optimal; the result is (1 + c) g / (1 + c^2).
    g = random_grads(5)
    result, _ = aligned("cagrad", g, g)
    torch.testing.assert_close(result, 1.5 / 1.25 * flat(g))
    # Opposite gradients: the average is zero and so is the result.
    result, stats = aligned("cagrad", g, [-t for t in g])
    assert stats.conflict and result.abs().max() < 1e-6
    # Closed-form weight beats a fine grid of the objective.
    for cosine in (-0.9, -0.2, 0.4, 0.95):
        for ratio in (0.1, 1.0, 8.0):
            gc, ga = (flat(t) for t in pair_with_cosine(7, cosine, ratio))
            dot, nc, na = (float(v) for v in (torch.dot(gc, ga), gc.norm() ** 2, ga.norm() ** 2))
            cs = 0.5 * float(((gc + ga) / 2).norm())
            grid = np.linspace(0, 1, 20001)
            values = (grid * (nc + dot) / 2 + (1 - grid) * (na + dot) / 2
                      + cs * np.sqrt(np.maximum(0.0, grid ** 2 * nc + 2 * grid * (1 - grid) * dot
                                                + (1 - grid) ** 2 * na)))
            w = cagrad_weight(dot, nc, na, cs)
            gw = w * gc + (1 - w) * ga
            best = float(torch.dot(gw, (gc + ga) / 2) + cs * gw.norm())
            assert 0 <= w <= 1 and best <= values.min() + 1e-9


def test_partitions_sum_to_the_whole():
    """Simulated ZeRO: each 'rank' owns a contiguous slice of the flat gradient (splitting tensors)."""
    gc, ga = random_grads(8), random_grads(9)
    ga = [a - c for a, c in zip(ga, gc)]
    vc, va = flat(gc), flat(ga)
    cut = vc.numel() // 2 + 3
    parts_c = [list(vc[:cut].split([20, cut - 20])), list(vc[cut:].split([5, vc.numel() - cut - 5]))]
    parts_a = [list(va[:cut].split([20, cut - 20])), list(va[cut:].split([5, va.numel() - cut - 5]))]
    partial = [partial_products(c, a) for c, a in zip(parts_c, parts_a)]
    torch.testing.assert_close(partial[0] + partial[1], partial_products(gc, ga), atol=1e-12, rtol=1e-12)
    for method in ("pcgrad", "gradvac", "cagrad"):
        aligner = GradientAligner(method)
        stats = aligner.coefficients(partial[0] + partial[1])
        pieces = [combine_([t.clone() for t in c], a, stats.coef_clean, stats.coef_aug)
                  for c, a in zip(parts_c, parts_a)]
        combined = torch.cat([t for piece in pieces for t in piece])
        torch.testing.assert_close(combined, REFERENCES[method](vc, va), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("positive_only", [True, False])
def test_gradvac_ema_over_steps_matches_reference(positive_only):
    aligner = GradientAligner("gradvac", gradvac_beta=0.5, gradvac_ema_positive_only=positive_only)
    reference = RefGradVac(beta=0.5, positive_only=positive_only)
    adjusted = 0
    for step, cosine in enumerate([0.6, 0.2, -0.3, 0.8, 0.05, -0.7, 0.4]):
        gc, ga = pair_with_cosine(step, cosine, norm_ratio=0.5 + step / 4)
        result, stats = aligned("gradvac", gc, ga, aligner=aligner)
        torch.testing.assert_close(result, reference(flat(gc), flat(ga)), atol=1e-6, rtol=1e-6)
        assert stats.target_cosine == pytest.approx(float(reference.targets[0, 1]), abs=1e-12)
        assert float(reference.targets[0, 1]) == pytest.approx(float(reference.targets[1, 0]), abs=1e-12)
        adjusted += stats.adjusted
    assert 0 < adjusted < 7  # some steps lifted the cosine, some did not
    # The target is checkpointable: a restored aligner continues identically.
    restored = GradientAligner.from_config(
        DualPathConfig(method="gradvac", gradvac_ema_positive_only=positive_only))
    restored.load_state_dict(aligner.state_dict())
    gc, ga = pair_with_cosine(50, 0.1)
    torch.testing.assert_close(aligned("gradvac", gc, ga, aligner=restored)[0],
                               aligned("gradvac", gc, ga, aligner=aligner)[0], atol=0, rtol=0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="method"):
        GradientAligner("nope")
    with pytest.raises(ValueError, match="shape"):
        partial_products([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="gradient tensors"):
        partial_products([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="state is for method"):
        GradientAligner("pcgrad").load_state_dict(GradientAligner("gradvac").state_dict())


# ----------------------------------------------------------------------- real 2-process gloo run


STEP_COSINES = [0.5, -0.4, 0.1]


def _worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {}
        for method in ("pcgrad", "gradvac", "cagrad"):
            aligner = GradientAligner(method)
            outputs = []
            for step, cosine in enumerate(STEP_COSINES):
                gc, ga = (flat(t) for t in pair_with_cosine(step, cosine))
                half = gc.numel() // 2
                own = slice(0, half) if rank == 0 else slice(half, None)
                # The rank's partition, split into two tensors like a ZeRO partition of two groups.
                mine_c = list(gc[own].clone().tensor_split(2))
                mine_a = list(ga[own].clone().tensor_split(2))
                stats = aligner.align_(mine_c, mine_a, group=dist.group.WORLD)
                outputs.append(torch.cat(mine_a))
                results[f"{method}_stats_{step}"] = torch.tensor([stats.coef_clean, stats.coef_aug])
            results[method] = torch.stack(outputs)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for method in ("pcgrad", "gradvac", "cagrad"):
        reference = RefGradVac() if method == "gradvac" else REFERENCES[method]
        for step, cosine in enumerate(STEP_COSINES):
            gc, ga = (flat(t) for t in pair_with_cosine(step, cosine))
            combined = torch.cat([ranks[0][method][step], ranks[1][method][step]])
            torch.testing.assert_close(combined, reference(gc, ga), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ranks[0][f"{method}_stats_{step}"], ranks[1][f"{method}_stats_{step}"],
                                       atol=0, rtol=0)
