"""SAM / ASAM / LookSAM inside real 2-rank DeepSpeed engines (gloo, CPU) against a one-process
textbook reference written here (plain PyTorch, whole batch, torch.optim.AdamW).

One launch runs every configuration (ZeRO 1/2/3, fp32 and bf16, a small MLP and the tiny wav2vec 2.0
detector, gradient accumulation, clipping), so the whole file costs one process-group start-up."""

from __future__ import annotations

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
GLOBAL_BATCH = 8  # samples per optimiser step, split over ranks then micro-batches
MLP_SAMPLES = 64
W2V2_SAMPLES = 2400
RHO, ASAM_RHO, ETA = 0.05, 0.5, 0.01
LOOKSAM_ALPHA, LOOKSAM_EVERY = 0.7, 2
ESAM_WEIGHTS, ESAM_DATA, SEED = 0.5, 0.5, 1234  # ESAM: fraction of weights perturbed, of samples in pass 2
BETAS, ADAM_EPS, WEIGHT_DECAY = (0.9, 0.999), 1e-4, 0.01
NORM_EPS = 1e-12


def _sharpness_cfg():
    from posttrain.eval.sharpness import SharpnessConfig

    return SharpnessConfig(rho=0.05, batch_size=3, max_seconds=0.5)


@dataclass(frozen=True)
class Case:
    name: str
    stage: int
    model: str = "mlp"  # "mlp" | "w2v2"
    mode: str = "sam"  # "sam" | "asam" | "looksam" | "esam" | "plain"
    accum: int = 1
    steps: int = 3
    lr: float = 5e-3
    clip: float = 0.0
    precision: str = "fp32"
    rho: float | None = None  # None: RHO (ASAM_RHO)
    adam_eps: float = ADAM_EPS
    weight_decay: float = WEIGHT_DECAY

    @property
    def sam_rho(self) -> float:
        return self.rho if self.rho is not None else ASAM_RHO if self.mode == "asam" else RHO


FP32_CASES = [
    Case("sam-z1", 1, clip=0.05),
    Case("asam-z1", 1, mode="asam", accum=2),
    Case("sam-z2-accum", 2, accum=2),
    Case("asam-z2", 2, mode="asam", clip=0.05),
    Case("sam-z3", 3, clip=0.05),
    Case("asam-z3-accum", 3, mode="asam", accum=2),
    Case("looksam-z2", 2, mode="looksam", accum=2, steps=4),
    Case("looksam-z3", 3, mode="looksam", steps=4, clip=0.05),
    Case("sam-w2v2-z3-accum", 3, model="w2v2", accum=2, steps=2),
    Case("asam-w2v2-z2", 2, model="w2v2", mode="asam", steps=2),
    Case("plain-z2", 2, mode="plain"),
    # ESAM: with accumulation 2 over 2 ranks a micro-batch holds 2 samples, so some of them have no
    # selected sample in the second pass and run as join batches
    Case("esam-z1", 1, mode="esam", clip=0.05),
    Case("esam-z2-accum", 2, mode="esam", accum=2),
    Case("esam-z3-accum", 3, mode="esam", accum=2),
    Case("esam-w2v2-z3", 3, model="w2v2", mode="esam", steps=2),
]
BF16_CASES = [Case(f"bf16-lr0-z{stage}", stage, mode=mode, lr=0.0, steps=2, precision="bf16", accum=2)
              for stage, mode in ((1, "sam"), (2, "asam"), (3, "sam"), (3, "asam"))]
# One bf16 step whose update reveals the gradient it applied: without weight decay AdamW's first step
# moves the fp32 master by -lr g / (|g| + eps), which inverts exactly (``applied_gradient``); eps is
# near the largest gradient elements so the inversion stays well conditioned. rho is large enough
# that the SAM gradient differs from the plain one by far more than bf16 rounding.
BF16_DIRECTION_CASES = [Case(f"bf16-direction-{mode}-z{stage}", stage, mode=mode, accum=accum, steps=1, lr=1e-3,
                             precision="bf16", rho=rho, adam_eps=0.1, weight_decay=0.0)
                        for stage, mode, accum, rho in ((1, "sam", 2, 0.5), (2, "sam", 1, 0.5), (3, "sam", 2, 0.5),
                                                        (3, "asam", 1, 2.0))]


# ------------------------------------------------------------------------------ models and data


class TinyMLP(nn.Module):
    """(waveforms, lengths) -> [fake, real] logits, like the detector; weights and biases for ASAM."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(MLP_SAMPLES, 16), nn.Tanh(), nn.Dropout(dropout), nn.LayerNorm(16),
                                  nn.Linear(16, 2))

    def forward(self, waveforms, lengths):
        # the first MLP_SAMPLES samples, zero-padded: a join batch's dummy input has another length
        waveforms = F.pad(waveforms, (0, max(0, MLP_SAMPLES - waveforms.shape[1])))
        return self.body(waveforms[:, :MLP_SAMPLES].to(self.body[0].weight.dtype))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(7)
    if kind == "mlp":
        return TinyMLP()
    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    return build_detector(ModelConfig(preset="tiny"))  # dropout 0, LayerDrop 0, no SpecAugment


def _tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    return make_model("w2v2").eval()


def make_data(case: Case) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per step: the global batch (waveforms, lengths, labels)."""
    samples = MLP_SAMPLES if case.model == "mlp" else W2V2_SAMPLES
    generator = torch.Generator().manual_seed(11)
    steps = []
    for _ in range(case.steps):
        waves = torch.randn(GLOBAL_BATCH, samples, generator=generator)
        lengths = torch.randint(samples // 2, samples + 1, (GLOBAL_BATCH,), generator=generator)
        if case.model == "mlp":
            lengths.fill_(samples)
        waves = waves * (torch.arange(samples)[None, :] < lengths[:, None])
        labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)
        steps.append((waves, lengths, labels))
    return steps


# ---------------------------------------------------------------------------- the reference


def _t_factors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Official ASAM: T = |w| + eta on parameters named *weight*, 1 on the others."""
    return {name: (p.detach().abs() + ETA) if "weight" in name else torch.ones_like(p)
            for name, p in model.named_parameters()}


def _gradient(model: nn.Module, waves, lengths, labels, round_inputs: bool = False) -> dict[str, torch.Tensor]:
    """``round_inputs``: the model inputs rounded to bf16, as a bf16 model sees them."""
    from posttrain.data.batch import normalize_waveforms

    model.zero_grad()
    # the step's last input stage: per-utterance normalisation on the device
    inputs = normalize_waveforms(waves, lengths)
    if round_inputs:
        inputs = inputs.to(torch.bfloat16).float()
    F.cross_entropy(model(inputs, lengths).float(), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def sam_gradient(model: nn.Module, case: Case, g: dict[str, torch.Tensor], waves, lengths, labels,
                 round_inputs: bool = False) -> dict[str, torch.Tensor]:
    """The textbook SAM / ASAM gradient at ``w + e`` given the plain one ``g``; weights restored. The
    norm is accumulated in fp32 whatever the model's dtype; the perturbed weights stay in its dtype."""
    params = dict(model.named_parameters())
    t = _t_factors(model) if case.mode == "asam" else {n: torch.ones_like(p) for n, p in params.items()}
    norm = math.sqrt(sum(float((t[n].float() * g[n].float()).square().sum()) for n in g))
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_((case.sam_rho * t[n].float() ** 2 * g[n].float() / (norm + NORM_EPS)).to(p.dtype))
    final = _gradient(model, waves, lengths, labels, round_inputs)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return final


def _sample_losses(model: nn.Module, waves, lengths, labels) -> torch.Tensor:
    from posttrain.data.batch import normalize_waveforms

    with torch.no_grad():
        return F.cross_entropy(model(normalize_waveforms(waves, lengths), lengths).float(), labels, reduction="none")


def esam_gradient(model: nn.Module, case: Case, g: dict[str, torch.Tensor], step: int, waves, lengths,
                  labels) -> dict[str, torch.Tensor]:
    """Textbook ESAM (Du et al. 2022) on the whole global batch: e = rho (m * g) / (beta ||g||) with the
    step's Bernoulli(beta) mask over each WHOLE parameter; the gradient at w + e of the mean loss of
    the ceil(gamma N) samples whose loss rose most (ties: the earlier sample); weights restored."""
    from posttrain.train.sam import _mask_key, keep_mask

    params = dict(model.named_parameters())
    norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
    before = _sample_losses(model, waves, lengths, labels)
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            mask = keep_mask(_mask_key(SEED, step, n), 0, p.numel(), ESAM_WEIGHTS, p.device).view_as(p)
            p.add_(case.sam_rho * g[n] * mask / ESAM_WEIGHTS / (norm + NORM_EPS))
    increase = _sample_losses(model, waves, lengths, labels) - before
    count = math.ceil(ESAM_DATA * len(labels))
    ranked = sorted(range(len(labels)), key=lambda i: (-float(increase[i]), i))
    chosen = torch.tensor(sorted(ranked[:count]))
    final = _gradient(model, waves[chosen], lengths[chosen], labels[chosen])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    return final


def reference_weights(case: Case) -> dict[str, torch.Tensor]:
    model = make_model(case.model)
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(params.values(), lr=case.lr, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    orthogonal = None

    for step, (waves, lengths, labels) in enumerate(make_data(case)):
        g = _gradient(model, waves, lengths, labels)
        if case.mode == "esam":
            final = esam_gradient(model, case, g, step, waves, lengths, labels)
        elif case.mode == "plain" or (case.mode == "looksam" and step % LOOKSAM_EVERY):
            final = g
            if case.mode == "looksam":
                g_norm = math.sqrt(sum(float(v.square().sum()) for v in g.values()))
                v_norm = math.sqrt(sum(float(v.square().sum()) for v in orthogonal.values()))
                final = {n: g[n] + LOOKSAM_ALPHA * g_norm / v_norm * orthogonal[n] for n in g}
        else:
            final = sam_gradient(model, case, g, waves, lengths, labels)
            if case.mode == "looksam":
                dot = sum(float((final[n] * g[n]).sum()) for n in g)
                g_sq = sum(float(g[n].square().sum()) for n in g)
                orthogonal = {n: final[n] - dot / g_sq * g[n] for n in g}
        for n, p in params.items():
            p.grad = final[n].clone()
        if case.clip:
            torch.nn.utils.clip_grad_norm_(params.values(), case.clip)
        optimizer.step()
    return {n: p.detach().clone() for n, p in params.items()}


def applied_gradient(before: dict, after: dict, case: Case) -> dict[str, torch.Tensor]:
    """The gradient AdamW's first step applied (no weight decay, no clipping), from the fp32 master
    weights: ``w' = w - lr u`` with ``u = g / (|g| + eps)``, so ``g = eps u / (1 - |u|)``."""
    out = {}
    for n in before:
        u = (before[n].double() - after[n].double()) / case.lr
        out[n] = case.adam_eps * u / (1 - u.abs())
    return out


def bf16_reference_gradients(case: Case, master: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Textbook SAM gradients of the first step from the engine's initial (bf16-rounded) weights:
    ``fp32``: computed in fp32 on the bf16-rounded weights and inputs; ``bf16``: the same computation
    in bf16 (its distance from ``fp32`` is the bf16 error of the computation); ``plain``: the fp32
    first-pass gradient (what a step that ignored the second pass would apply)."""
    waves, lengths, labels = make_data(case)[0]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(case.model)
        model.load_state_dict({n: w.to(torch.bfloat16).float() for n, w in master.items()})
        model.to(dtype)
        g = _gradient(model, waves, lengths, labels, round_inputs=True)
        out["fp32" if dtype == torch.float32 else "bf16"] = sam_gradient(model, case, g, waves, lengths, labels,
                                                                        round_inputs=True)
        if dtype == torch.float32:
            out["plain"] = g
    return {kind: {n: t.double() for n, t in grads.items()} for kind, grads in out.items()}


def relative_distance(first: dict, second: dict) -> float:
    """||first - second|| / ||second|| over the whole flattened gradient."""
    num = sum(float((first[n] - second[n]).square().sum()) for n in second)
    return math.sqrt(num / sum(float(second[n].square().sum()) for n in second))


# ------------------------------------------------------------------------------ the ranks


def _config(case: Case):
    from posttrain.config import load_config

    adaptive = case.mode == "asam"
    return load_config(None, [
        f"train.zero_stage={case.stage}", f"train.precision={case.precision}", f"train.grad_accum_steps={case.accum}",
        "train.device=cpu", f"sam.enabled={case.mode != 'plain'}", f"sam.adaptive={adaptive}",
        f"sam.rho={case.sam_rho}", f"sam.adaptive_eta={ETA}",
        f"sam.variant={case.mode if case.mode in ('looksam', 'esam') else 'sam'}",
        f"sam.looksam_every_steps={LOOKSAM_EVERY}", f"sam.esam_weight_fraction={ESAM_WEIGHTS}",
        f"sam.esam_data_fraction={ESAM_DATA}", f"train.seed={SEED}",
        f"sam.looksam_alpha={LOOKSAM_ALPHA}", f"optim.lr={case.lr}", f"optim.eps={case.adam_eps}",
        f"optim.weight_decay={case.weight_decay}", f"optim.betas=[{BETAS[0]}, {BETAS[1]}]",
        f"optim.grad_clip_norm={case.clip}"])


def _full_weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def _full_master_weights(engine) -> dict[str, torch.Tensor]:
    """The optimiser's fp32 master weights, gathered (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _rank_batches(case: Case, rank: int, waves, lengths, labels):
    from posttrain.data.batch import Batch

    share = GLOBAL_BATCH // WORLD_SIZE
    mine = slice(rank * share, (rank + 1) * share)
    chunks = zip(waves[mine].chunk(case.accum), lengths[mine].chunk(case.accum), labels[mine].chunk(case.accum))
    return [Batch(w.contiguous(), n, y) for w, n, y in chunks]


def _run_case(case: Case, rank: int) -> dict:
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.optim.partitions import owned_parameters
    from posttrain.train.sam import sharpness_aware_step
    from posttrain.train.step import StepContext, get_step_mode, step_mode_name

    cfg = _config(case)
    model = make_model(case.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = LambdaLR(optimizer, lambda _: 1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                      world_size=WORLD_SIZE)
    step_fn = get_step_mode(step_mode_name(cfg))
    before = _full_weights(engine)
    result: dict = {"grad_norms": [], "extras": []}
    if case.name.startswith("bf16-direction"):
        result["master_before"] = _full_master_weights(engine)
    for step, data in enumerate(make_data(case)):
        ctx.step = step
        stats = step_fn(engine, _rank_batches(case, rank, *data), ctx)
        result["grad_norms"].append(stats.grad_norm)
        result["extras"].append(stats.extra)
    result["weights"] = _full_weights(engine)
    if case.name.startswith("bf16-direction"):
        result["master_after"] = _full_master_weights(engine)
    elif case.precision == "bf16":
        result["unchanged"] = all(torch.equal(before[n], result["weights"][n]) for n in before)
        # restore checked where step() cannot hide it: the owned partitions right after the restore
        batches = _rank_batches(case, rank, *make_data(case)[0])
        owned_before = [t.clone() for t in owned_parameters(engine).model]

        def run_pass():
            total = torch.zeros(())
            for index, batch in enumerate(batches):
                engine.set_gradient_accumulation_boundary(index == len(batches) - 1)
                loss = F.cross_entropy(engine(batch.waveforms, batch.lengths).float(), batch.labels)
                engine.backward(loss)
                total += loss.detach()
            return total

        def check_restored(outcome):
            owned_after = owned_parameters(engine).model
            result["restored_bitwise"] = outcome.perturbed and all(
                torch.equal(a, b) for a, b in zip(owned_before, owned_after))
            return engine.step()

        sharpness_aware_step(engine, run_pass, cfg.sam, apply_update=check_restored)
    engine.destroy()
    return result


def _dropout_masks_and_flags(rank: int) -> dict:
    """A SAM step with dropout 0.5 and a tiny rho: the two passes' logits must agree (same masks);
    the perturbed flag is up during the second pass only."""
    import dataclasses

    import deepspeed

    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.perturbation import PerturbedWeightsError, assert_not_perturbed
    from posttrain.train.sam import sharpness_aware_step

    def is_perturbed(engine) -> bool:
        try:
            assert_not_perturbed(engine)
        except PerturbedWeightsError:
            return True
        return False

    case = Case("dropout", 2)
    cfg = _config(case)
    torch.manual_seed(7)
    model = TinyMLP(dropout=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=deepspeed_config(cfg))
    batches = _rank_batches(case, rank, *make_data(case)[0])
    records = []

    def run_pass():
        total, logits = torch.zeros(()), []
        for index, batch in enumerate(batches):
            engine.set_gradient_accumulation_boundary(index == len(batches) - 1)
            out = engine(batch.waveforms, batch.lengths)
            logits.append(out.detach().clone())
            loss = F.cross_entropy(out, batch.labels)
            engine.backward(loss)
            total += loss.detach()
        records.append((torch.cat(logits), is_perturbed(engine)))
        return total

    sharpness_aware_step(engine, run_pass, dataclasses.replace(cfg.sam, rho=1e-6))
    after = is_perturbed(engine)
    with torch.no_grad():  # the control: two forwards without restoring the RNG draw different masks
        control = float((engine(batches[0].waveforms, batches[0].lengths)
                         - engine(batches[0].waveforms, batches[0].lengths)).abs().max())
    engine.destroy()
    return {"gap": float((records[0][0] - records[1][0]).abs().max()), "control_gap": control,
            "flags": [flag for _, flag in records] + [after]}


def _refused_zero_layout(rank: int) -> str:
    """A real ZeRO-3 engine that keeps small parameters persistent (DeepSpeed's default threshold,
    set behind the config check's back): the SAM step refuses it instead of perturbing partitions
    the forward never reads."""
    import deepspeed

    from posttrain.config import ConfigError
    from posttrain.train.trainer import build_optimizer
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.sam import sharpness_aware_step

    case = Case("persistent", 3)
    cfg = _config(case)
    config = deepspeed_config(cfg)
    del config["zero_optimization"]["stage3_param_persistence_threshold"]
    model = make_model("mlp")
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=config)
    batch = _rank_batches(case, rank, *make_data(case)[0])[0]

    def run_pass():
        engine.set_gradient_accumulation_boundary(True)
        loss = F.cross_entropy(engine(batch.waveforms, batch.lengths), batch.labels)
        engine.backward(loss)
        return loss.detach()

    try:
        sharpness_aware_step(engine, run_pass, cfg.sam)
        message = "not refused"
    except ConfigError as error:
        message = str(error)
    engine.destroy()
    return message


def _distributed_sharpness(shard_dir: str) -> dict:
    from posttrain.dist import dist_info
    from posttrain.eval.sharpness import catalog, grouped_sets, measure_sets

    results = measure_sets(_tiny_detector(), grouped_sets(catalog(shard_dir), "language"), _sharpness_cfg(),
                           device=torch.device("cpu"), info=dist_info())
    return {name: result.to_dict() for name, result in results.items()}


def _worker(rank: int, port: int, cases: list[dict], out: str, shard_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from posttrain.dist import start_process_group

    start_process_group(torch.device("cpu"), deepspeed=True)
    results = {case["name"]: _run_case(Case(**case), rank) for case in cases}
    results["_dropout"] = _dropout_masks_and_flags(rank)
    results["_refused_layout"] = _refused_zero_layout(rank)
    results["_sharpness"] = _distributed_sharpness(shard_dir)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory, shard_dir):
    out = str(tmp_path_factory.mktemp("sam_dist") / "results.pt")
    mp.spawn(_worker, args=(free_port(), [asdict(c) for c in FP32_CASES + BF16_CASES + BF16_DIRECTION_CASES], out,
                                   str(shard_dir)),
             nprocs=WORLD_SIZE, join=True)
    return torch.load(out, weights_only=False)


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: c.name)
def test_sharded_sam_matches_single_process_reference(dist_results, case):
    got = dist_results[case.name]["weights"]
    want = reference_weights(case)
    worst = max(float((got[n] - want[n]).abs().max()) for n in want)
    assert worst < 2e-6, f"{case.name}: max |w_ds - w_ref| = {worst:.3g}"
    if case.mode != "plain":  # the control: the same run without SAM lands elsewhere
        control = reference_weights(Case(case.name, case.stage, case.model, "plain", case.accum, case.steps,
                                         case.lr, case.clip))
        assert max(float((got[n] - control[n]).abs().max()) for n in want) > 1e-4


@pytest.mark.dist
@pytest.mark.slow
def test_sam_statistics_and_clipping_engaged(dist_results):
    clipped = [c for c in FP32_CASES if c.clip]
    assert any(n > c.clip for c in clipped for n in dist_results[c.name]["grad_norms"])  # the clip did act
    sam = dist_results["sam-z2-accum"]["extras"]
    assert all(e["sam/grad_norm"] > 0 and e["sam/full_step"] == 1.0 and "sam/loss_increase" in e for e in sam)
    assert [e["sam/full_step"] for e in dist_results["looksam-z3"]["extras"]] == [1.0, 0.0, 1.0, 0.0]
    assert all(e["esam/selected_fraction"] == ESAM_DATA for e in dist_results["esam-z2-accum"]["extras"])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_sam_restores_weights_bitwise(dist_results, case):
    result = dist_results[case.name]
    assert result["unchanged"], "a zero-lr SAM step changed bf16 weights"
    assert result["restored_bitwise"], "owned partitions differ after the restore"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", BF16_DIRECTION_CASES, ids=lambda c: c.name)
def test_bf16_update_applies_the_second_pass_gradient(dist_results, case):
    """The gradient a bf16 SAM step applied (read back from the fp32 master update) is the textbook
    SAM gradient up to the bf16 error of the computation itself (the same SAM computed in bf16 vs in
    fp32, from the same bf16-rounded weights and inputs), and far from the first-pass gradient."""
    result = dist_results[case.name]
    applied = applied_gradient(result["master_before"], result["master_after"], case)
    want = bf16_reference_gradients(case, result["master_before"])
    tolerance = 3 * relative_distance(want["bf16"], want["fp32"]) + 1e-3
    assert relative_distance(want["plain"], want["fp32"]) > 3 * tolerance  # the test can tell them apart
    gap = relative_distance(applied, want["fp32"])
    assert gap < tolerance, f"{case.name}: applied vs SAM gradient {gap:.3g} (tolerance {tolerance:.3g})"


@pytest.mark.dist
@pytest.mark.slow
def test_a_sam_step_refuses_zero3_persistent_parameters(dist_results):
    assert dist_results["_refused_layout"].startswith("zero_optimization.stage3_param_persistence_threshold:")


@pytest.mark.dist
@pytest.mark.slow
def test_both_passes_share_dropout_masks_and_the_perturbed_flag_is_scoped(dist_results):
    result = dist_results["_dropout"]
    assert result["gap"] < 1e-4 < result["control_gap"]
    assert result["flags"] == [False, True, False]


@pytest.mark.dist
@pytest.mark.slow
def test_sharpness_split_over_ranks_equals_one_process(dist_results, shard_dir):
    from posttrain.eval.sharpness import catalog, grouped_sets, measure_sets

    single = measure_sets(_tiny_detector(), grouped_sets(catalog(shard_dir), "language"), _sharpness_cfg(),
                          device=torch.device("cpu"))
    split = dist_results["_sharpness"]
    assert set(split) == set(single)
    for name, result in single.items():
        assert split[name]["samples"] == result.samples and split[name]["batches"] == result.batches
        assert split[name]["sharpness"] == pytest.approx(result.sharpness, rel=1e-5, abs=1e-9)
