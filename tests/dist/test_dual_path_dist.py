"""The dual-path (DPDA) step mode in real 2-rank DeepSpeed engines (gloo, CPU, fp32) against a
one-process textbook reference written here: clean and augmented full gradients of the same model on
the same global batch with torch.autograd, combined by PCGrad / GradVac / CAGrad as their papers state
them (CAGrad's inner problem solved numerically with scipy, not in closed form), clipped, then
torch.optim.AdamW.

One launch runs every configuration (ZeRO 1/2/3, gradient accumulation, clipping, a rank with a join
batch, a non-finite step, the tiny wav2vec 2.0 detector), so the file costs one process-group start."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from posttrain.dist import free_port

WORLD_SIZE = 2
MLP_SAMPLES = 256
W2V2_SAMPLES = 2400
# eps 1e-3: Adam divides by sqrt(v) + eps, so lr / eps bounds how much float noise in a near-zero
# gradient element (reduction order differs across ranks) can move a weight
BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-3, 0.01
GRADVAC_BETA, CAGRAD_C = 0.5, 0.5
EVEN_SPLIT = ((2, 2), (2, 2))  # samples per (rank, micro-batch)


@dataclass(frozen=True)
class Case:
    name: str
    stage: int
    method: str = "pcgrad"
    augment: str = "rawboost"  # rawboost | flip (labels flipped: conflicting) | identity (agreeing) | nan_step1
    model: str = "mlp"
    split: tuple = EVEN_SPLIT  # per rank, samples of each micro-batch (accumulation = micro-batches per rank)
    steps: int = 3
    lr: float = 5e-3
    clip: float = 0.0
    precision: str = "fp32"
    adam_eps: float = ADAM_EPS
    weight_decay: float = WEIGHT_DECAY

    @property
    def accum(self) -> int:
        return len(self.split[0])

    @property
    def global_batch(self) -> int:
        return sum(sum(sizes) for sizes in self.split)


CASES = [
    Case("pcgrad-z2-rawboost", 2, split=((1, 3), (2, 2))),
    Case("pcgrad-z3-rawboost", 3, clip=0.05),
    Case("pcgrad-z2-flip", 2, augment="flip", clip=0.05),
    Case("pcgrad-z3-flip-join", 3, augment="flip", split=((2, 2), (2, 0))),
    Case("pcgrad-z1-flip", 1, augment="flip"),
    Case("gradvac-z2", 2, method="gradvac", augment="half_flip", steps=4),
    Case("gradvac-z3", 3, method="gradvac", augment="half_flip", steps=4, clip=0.05),
    Case("cagrad-z2", 2, method="cagrad", augment="flip"),
    Case("cagrad-z3", 3, method="cagrad", split=((2, 2), (2, 0))),
    Case("pcgrad-z2-identity", 2, augment="identity"),
    Case("pcgrad-z3-nan-step1", 3, augment="nan_step1"),
    Case("pcgrad-w2v2-z3", 3, model="w2v2", split=((2,), (2,)), steps=2),
]
# bf16 (DeepSpeed's bf16 ZeRO optimisers), one step whose update reveals the gradient it applied:
# without weight decay AdamW's first step moves the fp32 master by -lr g / (|g| + eps), which inverts
# exactly (``applied_gradient``); eps near the largest gradient elements keeps the inversion well
# conditioned. Conflicting paths (flip), so the combination is far from the clean gradient alone.
BF16_CASES = [Case(f"bf16-{method}-z{stage}", stage, method=method, augment=augment, precision="bf16", steps=1,
                   lr=1e-3, adam_eps=0.1, weight_decay=0.0)
              for stage, method, augment in ((1, "pcgrad", "flip"), (2, "pcgrad", "half_flip"), (3, "pcgrad", "flip"),
                                             (3, "cagrad", "half_flip"))]


# ------------------------------------------------------------------------------ models and data


class TinyMLP(nn.Module):
    """(waveforms, lengths) -> [fake, real] logits, like the detector; reads the first MLP_SAMPLES
    samples (zero-padded: a join batch's dummy input is longer)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(MLP_SAMPLES, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 2))

    def forward(self, waveforms, lengths):
        waveforms = F.pad(waveforms, (0, max(0, MLP_SAMPLES - waveforms.shape[1])))
        return self.body(waveforms[:, :MLP_SAMPLES].to(self.body[0].weight.dtype))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "mlp":
        return TinyMLP()
    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    return build_detector(ModelConfig(preset="tiny"))  # dropout 0, LayerDrop 0, no SpecAugment


def make_data(case: Case) -> list:
    """Per step, the global raw batch (a posttrain Batch with ids ``s<step>-<i>``)."""
    from posttrain.data.batch import Batch

    samples = MLP_SAMPLES if case.model == "mlp" else W2V2_SAMPLES
    generator = torch.Generator().manual_seed(11)
    steps = []
    for step in range(case.steps):
        n = case.global_batch
        waves = 0.3 * torch.randn(n, samples, generator=generator)
        lengths = torch.full((n,), samples) if case.model == "mlp" else \
            torch.randint(samples // 2, samples + 1, (n,), generator=generator)
        waves = waves * (torch.arange(samples)[None, :] < lengths[:, None])
        labels = torch.randint(0, 2, (n,), generator=generator)
        steps.append(Batch(waves, lengths, labels, [f"s{step}-{i}" for i in range(n)]))
    return steps


def make_augment(kind: str):
    """The augmented path's (raw batch, epoch) -> batch; None: the mode's own RawBoost (algo 4)."""
    import dataclasses

    if kind == "rawboost":
        return None
    if kind == "identity":
        return lambda batch, epoch: batch
    if kind == "flip":  # the opposite labels: at initialisation the two gradients nearly oppose
        return lambda batch, epoch: dataclasses.replace(batch, labels=1 - batch.labels)
    if kind == "half_flip":  # flip the even-numbered samples: cosines of either sign across steps
        def half_flip(batch, epoch):
            even = torch.tensor([int(i.split("-")[1]) % 2 == 0 for i in batch.ids], dtype=torch.long)
            return dataclasses.replace(batch, labels=torch.where(even.bool(), 1 - batch.labels, batch.labels))
        return half_flip
    if kind == "nan_step1":  # step 1's augmented audio is NaN: that step must be skipped on every rank
        def nan_step1(batch, epoch):
            if batch.ids and batch.ids[0].startswith("s1-"):
                return dataclasses.replace(batch, waveforms=torch.full_like(batch.waveforms, float("nan")))
            return batch
        return nan_step1
    raise ValueError(kind)


def reference_augment(kind: str):
    from posttrain.augment.rawboost import RawBoost
    from posttrain.config import RawBoostConfig

    return RawBoost(RawBoostConfig(), algo=4) if kind == "rawboost" else make_augment(kind)


# ---------------------------------------------------------------------------- the reference


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def pcgrad(g_c, g_a):
    """Yu et al. 2020, two tasks: project each gradient off the other when they conflict; mean."""
    dot = g_c @ g_a
    if dot < 0:
        g_c, g_a = g_c - dot / (g_a @ g_a) * g_a, g_a - dot / (g_c @ g_c) * g_c
    return (g_c + g_a) / 2


def gradvac(g_c, g_a, targets):
    """Wang et al. 2021, two tasks, one EMA target per ordered pair (both start at 0); DPDA's code
    moves a target only on positive cosines."""
    out = []
    for pair, (g_i, g_j) in enumerate(((g_c, g_a), (g_a, g_c))):
        rho = float(g_i @ g_j / (g_i.norm() * g_j.norm()))
        phi = targets[pair]
        if rho < phi:
            g_i = g_i + g_i.norm() * (phi * math.sqrt(1 - rho**2) - rho * math.sqrt(1 - phi**2)) \
                / (g_j.norm() * math.sqrt(1 - phi**2)) * g_j
        if rho > 0:
            targets[pair] = (1 - GRADVAC_BETA) * phi + GRADVAC_BETA * rho
        out.append(g_i)
    return (out[0] + out[1]) / 2


def cagrad(g_c, g_a):
    """Liu et al. 2021: w* = argmin_{w in [0,1]} <g_w, g_0> + c ||g_0|| ||g_w||, solved numerically;
    g = (g_0 + c ||g_0|| / ||g_w*|| g_w*) / (1 + c^2)."""
    from scipy.optimize import minimize_scalar

    g_0 = (g_c + g_a) / 2
    radius = CAGRAD_C * float(g_0.norm())
    gram = torch.stack([g_c, g_a]) @ torch.stack([g_c, g_a]).T
    b = gram @ torch.tensor([0.5, 0.5], dtype=torch.float64)

    def objective(w):
        x = torch.tensor([w, 1 - w], dtype=torch.float64)
        return float(x @ b + radius * torch.sqrt(x @ gram @ x))

    w = minimize_scalar(objective, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}).x
    g_w = w * g_c + (1 - w) * g_a
    return (g_0 + radius / g_w.norm() * g_w) / (1 + CAGRAD_C**2)


def path_gradient(model: nn.Module, batch, round_inputs: bool = False) -> torch.Tensor:
    """The flattened gradient of the mean cross-entropy; ``round_inputs``: the model inputs rounded to
    bf16, as a bf16 model sees them."""
    from posttrain.data.batch import normalize_waveforms

    model.zero_grad()
    inputs = normalize_waveforms(batch.waveforms, batch.lengths)
    if round_inputs:
        inputs = inputs.to(torch.bfloat16).float()
    F.cross_entropy(model(inputs, batch.lengths).float(), batch.labels).backward()
    return flat(p.grad for p in model.parameters())


def combine(case: Case, g_c: torch.Tensor, g_a: torch.Tensor, targets: list[float]) -> torch.Tensor:
    if case.method == "gradvac":
        return gradvac(g_c, g_a, targets)
    return {"pcgrad": pcgrad, "cagrad": cagrad}[case.method](g_c, g_a)


def reference_run(case: Case) -> dict:
    model = make_model(case.model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=case.lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    augment = reference_augment(case.augment)
    targets = [0.0, 0.0]
    cosines, conflicts = [], 0

    for batch in make_data(case):
        g_c, g_a = path_gradient(model, batch), path_gradient(model, augment(batch, 0))
        if not (torch.isfinite(g_c).all() and torch.isfinite(g_a).all()):
            cosines.append(float("nan"))
            continue  # the skipped step: no update, no EMA move, not counted
        cosines.append(float(g_c @ g_a / (g_c.norm() * g_a.norm())))
        conflicts += int(g_c @ g_a < 0)
        g = combine(case, g_c, g_a, targets)
        offset = 0
        for p in params:
            p.grad = g[offset: offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        if case.clip:
            torch.nn.utils.clip_grad_norm_(params, case.clip)
        optimizer.step()
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "cosines": cosines,
            "conflicts": conflicts, "targets": targets}


def applied_gradient(before: dict, after: dict, case: Case) -> torch.Tensor:
    """The flattened gradient AdamW's first step applied (no weight decay, no clipping), from the fp32
    master weights: ``w' = w - lr u`` with ``u = g / (|g| + eps)``, so ``g = eps u / (1 - |u|)``."""
    u = (flat(before.values()) - flat(after.values())) / case.lr
    return case.adam_eps * u / (1 - u.abs())


def bf16_reference_gradients(case: Case, master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first step's combined gradient from the engine's initial (bf16-rounded) weights: ``fp32``:
    computed in fp32 on the bf16-rounded weights and inputs; ``bf16``: the same computation in bf16
    (its distance from ``fp32`` is the bf16 error of the computation); ``clean``: the fp32 clean
    gradient alone (what a step that ignored the augmented path would apply)."""
    batch = make_data(case)[0]
    augment = reference_augment(case.augment)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(case.model)
        model.load_state_dict({n: w.to(torch.bfloat16).float() for n, w in master.items()})
        model.to(dtype)
        g_c = path_gradient(model, batch, round_inputs=True)
        g_a = path_gradient(model, augment(batch, 0), round_inputs=True)
        out["fp32" if dtype == torch.float32 else "bf16"] = combine(case, g_c, g_a, [0.0, 0.0])
        if dtype == torch.float32:
            out["clean"] = g_c
    return out


def relative_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).norm() / second.norm())


def plain_reference_weights(case: Case) -> dict:
    """The single-path control: AdamW on the clean gradient alone."""
    from posttrain.data.batch import normalize_waveforms

    model = make_model(case.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=case.lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    for batch in make_data(case):
        optimizer.zero_grad()
        F.cross_entropy(model(normalize_waveforms(batch.waveforms, batch.lengths), batch.lengths),
                        batch.labels).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------ the ranks


def _config(case: Case):
    from posttrain.config import load_config

    return load_config(None, [
        f"train.zero_stage={case.stage}", f"train.precision={case.precision}", f"train.grad_accum_steps={case.accum}",
        "train.device=cpu", "dual_path.enabled=true", f"dual_path.method={case.method}",
        f"dual_path.gradvac_beta={GRADVAC_BETA}", f"dual_path.cagrad_c={CAGRAD_C}", "dual_path.rawboost_algo=4",
        f"optim.lr={case.lr}", f"optim.eps={case.adam_eps}", f"optim.weight_decay={case.weight_decay}",
        f"optim.betas=[{BETAS[0]}, {BETAS[1]}]", f"optim.grad_clip_norm={case.clip}"])


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def _full_master_weights(engine) -> dict[str, torch.Tensor]:
    """The optimiser's fp32 master weights, gathered (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _rank_batches(case: Case, rank: int, batch) -> list:
    from posttrain.data.batch import Batch

    start = sum(sum(sizes) for sizes in case.split[:rank])
    out = []
    for size in case.split[rank]:
        if size == 0:
            out.append(Batch.empty())
            continue
        part = slice(start, start + size)
        out.append(Batch(batch.waveforms[part].contiguous(), batch.lengths[part], batch.labels[part],
                         batch.ids[part]))
        start += size
    return out


def _run_case(case: Case, rank: int) -> dict:
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from posttrain.train.dual_path import dual_path_step
    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.step import StepContext, get_step_mode, step_mode_name

    cfg = _config(case)
    assert get_step_mode(step_mode_name(cfg)) is dual_path_step
    model = make_model(case.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = LambdaLR(optimizer, lambda _: 1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    augment = make_augment(case.augment)
    state: dict = {}
    result: dict = {"stats": []}
    if case.precision == "bf16":
        result["master_before"] = _full_master_weights(engine)
    for step, batch in enumerate(make_data(case)):
        # a fresh context per step from the JSON of the last one's state: what a resume restores
        ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                          world_size=WORLD_SIZE, step=step, state=json.loads(json.dumps(state)))
        stats = dual_path_step(engine, _rank_batches(case, rank, batch), ctx, augment=augment)
        state = ctx.state
        result["stats"].append(asdict(stats))
    result["state"] = state
    result["weights"] = _full_weights(engine)
    if case.precision == "bf16":
        result["master_after"] = _full_master_weights(engine)
    engine.destroy()
    return result


def _worker(rank: int, port: int, cases: list[dict], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from posttrain.dist import start_process_group

    start_process_group(torch.device("cpu"), deepspeed=True)
    results = {case["name"]: _run_case(Case(**case), rank) for case in cases}
    torch.save(results, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dual_path_dist") / "results.pt")
    mp.spawn(_worker, args=(free_port(), [asdict(c) for c in CASES + BF16_CASES], out), nprocs=WORLD_SIZE, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(WORLD_SIZE)]


def _max_gap(first: dict, second: dict) -> float:
    return max(float((first[n] - second[n]).abs().max()) for n in second)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sharded_dual_path_matches_single_process_reference(dist_results, case):
    want = reference_run(case)
    got = dist_results[0][case.name]
    assert _max_gap(got["weights"], want["weights"]) < 1e-6, case.name
    assert _max_gap(dist_results[1][case.name]["weights"], want["weights"]) < 1e-6  # both ranks hold it
    cosines = [s["extra"]["dual_path/cosine"] for s in got["stats"]]
    assert cosines == pytest.approx(want["cosines"], abs=1e-5, nan_ok=True)
    measured = sum(math.isfinite(c) for c in want["cosines"])
    counts = got["state"]["dual_path"]
    assert (counts["aligned_steps"], counts["conflicts"]) == (measured, want["conflicts"])
    assert got["stats"][-1]["extra"]["dual_path/conflict_rate"] == pytest.approx(want["conflicts"] / measured)
    if case.method == "gradvac":
        assert counts["aligner"]["target_cosine"] == pytest.approx(want["targets"][0], abs=1e-6)
    if case.augment != "identity":  # the control: the clean path alone lands elsewhere
        assert _max_gap(got["weights"], plain_reference_weights(case)) > 1e-4


@pytest.mark.dist
@pytest.mark.slow
def test_conflicting_paths_are_projected_and_agreeing_paths_are_not(dist_results):
    for name in ("pcgrad-z2-flip", "pcgrad-z3-flip-join", "pcgrad-z1-flip"):
        extras = [s["extra"] for s in dist_results[0][name]["stats"]]
        assert all(e["dual_path/conflict"] == 1.0 and e["dual_path/adjusted"] == 1.0 for e in extras), name
        assert all(e["dual_path/cosine"] < 0 and e["dual_path/coef_clean"] > 0.5 for e in extras), name
        assert extras[-1]["dual_path/conflict_rate"] == 1.0
    case = next(c for c in CASES if c.name == "pcgrad-z2-identity")
    extras = [s["extra"] for s in dist_results[0][case.name]["stats"]]
    assert all(e["dual_path/conflict"] == 0.0 and e["dual_path/adjusted"] == 0.0 for e in extras)
    assert all(e["dual_path/cosine"] == pytest.approx(1.0, abs=1e-6) for e in extras)
    assert extras[-1]["dual_path/conflict_rate"] == 0.0
    # identical paths: the mean of two equal gradients is the plain clean-gradient update
    assert _max_gap(dist_results[0][case.name]["weights"], plain_reference_weights(case)) < 1e-6


@pytest.mark.dist
@pytest.mark.slow
def test_methods_and_clipping_were_exercised(dist_results):
    """Guards the reference comparison against vacuous passes: every method changed a plain mean,
    GradVac saw both conflicting and agreeing steps, and the clip acted."""
    for name in ("gradvac-z2", "gradvac-z3", "cagrad-z2", "cagrad-z3"):
        assert any(s["extra"]["dual_path/adjusted"] == 1.0 for s in dist_results[0][name]["stats"]), name
    signs = {s["extra"]["dual_path/conflict"] for s in dist_results[0]["gradvac-z2"]["stats"]}
    assert signs == {0.0, 1.0}
    clipped = [c for c in CASES if c.clip]
    assert any(s["grad_norm"] > c.clip for c in clipped for s in dist_results[0][c.name]["stats"])


@pytest.mark.dist
@pytest.mark.slow
def test_a_non_finite_augmented_path_skips_the_step_on_every_rank(dist_results):
    for rank in range(WORLD_SIZE):
        stats = dist_results[rank]["pcgrad-z3-nan-step1"]["stats"]
        assert [s["skipped"] for s in stats] == [False, True, False]
        assert math.isfinite(stats[1]["loss"]) is False and math.isnan(stats[1]["extra"]["dual_path/cosine"])
        assert stats[2]["extra"]["dual_path/aligned_steps"] == 2.0  # the skipped step was not counted


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_update_applies_the_aligned_gradient(dist_results, case):
    """The gradient a bf16 dual-path step applied (read back from the fp32 master update) is the
    textbook combination of the two paths up to the bf16 error of the computation itself (the same
    combination computed in bf16 vs in fp32, from the same bf16-rounded weights and inputs), and far
    from the clean gradient alone."""
    result = dist_results[0][case.name]
    assert not any(s["skipped"] for s in result["stats"])
    applied = applied_gradient(result["master_before"], result["master_after"], case)
    want = bf16_reference_gradients(case, result["master_before"])
    tolerance = 3 * relative_distance(want["bf16"], want["fp32"]) + 1e-3
    assert relative_distance(want["clean"], want["fp32"]) > 3 * tolerance  # the test can tell them apart
    gap = relative_distance(applied, want["fp32"])
    assert gap < tolerance, f"{case.name}: applied vs aligned gradient {gap:.3g} (tolerance {tolerance:.3g})"
