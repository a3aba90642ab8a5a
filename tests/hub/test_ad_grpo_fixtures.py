"""The AntiDeepfake GRPO / OC-softmax / recipe fixtures (tests/fixtures/ad_grpo, made by make_fixtures.py
with AD's own algo/rl.py and models/oc_softmax.py at 0dea622) load and agree with an independent
re-implementation written here from the formulas in tests/fixtures/ad_grpo/README.md: losses in float64,
gradients in closed form (no autograd), so the goldens are checked by something other than AD's code path.
posttrain's own implementations are tested against the same files elsewhere."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ad_grpo"
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}  # max |diff| / max(1, max |golden|), per tensor
GRPO = json.loads((FIXTURES / "grpo_cases.json").read_text(encoding="utf-8"))
OC = json.loads((FIXTURES / "oc_softmax_cases.json").read_text(encoding="utf-8"))
HPARAMS = json.loads((FIXTURES / "ft_grpo_hparams.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def grpo_tensors():
    return load_file(FIXTURES / "grpo_cases.safetensors")


@pytest.fixture(scope="module")
def oc_tensors():
    return load_file(FIXTURES / "oc_softmax_cases.safetensors")


def scaled_error(got: torch.Tensor | float, golden: torch.Tensor | float) -> float:
    got, golden = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(golden, dtype=torch.float64)
    return float((got - golden).abs().max() / max(1.0, float(golden.abs().max())))


def grpo_reference(logits, logits_ref, logits_old, sa, gt, rl):
    """GRPO loss and d loss / d logits from the formulas, in float64.

    N = B*M samples; reward 1 where the sampled label is the ground truth; advantage
    (reward - mean) / (unbiased std + std_floor) over all N; logp = log softmax(logits)[label];
    KL = exp(ref - logp) - (ref - logp) - 1; loss = -mean(pg - beta KL) with beta 1 when absent and
    pg = A (grpo2, value of exp(logp - sg(logp)) A) or min(r A, clip(r, 1-eps, 1+eps) A), r = exp(logp - logp_old).
    """
    z = logits.double()
    n = sa.numel()
    logp_all = z - torch.logsumexp(z, dim=1, keepdim=True)
    logp = logp_all.gather(1, sa)
    ref = (logits_ref.double() - torch.logsumexp(logits_ref.double(), dim=1, keepdim=True)).gather(1, sa)
    reward = (sa == gt.view(-1, 1)).double()
    mean = reward.sum() / n
    std = math.sqrt(float(((reward - mean) ** 2).sum()) / (n - 1))
    adv = (reward - mean) / (std + rl["std_floor"])
    d = ref - logp
    kl = d.exp() - d - 1
    beta = rl.get("beta", 1.0)
    if logits_old is None:  # grpo2
        pg, dpg = adv, adv
    else:  # grpo3
        old = (logits_old.double() - torch.logsumexp(logits_old.double(), dim=1, keepdim=True)).gather(1, sa)
        r = (logp - old).exp()
        eps = rl["epsilon"]
        clipped = r.clamp(1 - eps, 1 + eps)
        pg = torch.minimum(r * adv, clipped * adv)
        inside = (r >= 1 - eps) & (r <= 1 + eps)
        # outside the range the clipped branch is a constant: the sample's ratio gradient is 0 where it is taken
        dpg = torch.where(inside | (r * adv <= clipped * adv), r * adv, torch.zeros_like(r))
    loss = -((pg - beta * kl).sum() / n)
    dloss_dlogp = -(dpg + beta * (d.exp() - 1)) / n  # (B, M)
    probs = logp_all.exp()
    onehot_sum = torch.zeros_like(z).scatter_add_(1, sa, dloss_dlogp)
    grad = onehot_sum - dloss_dlogp.sum(1, keepdim=True) * probs
    return float(loss), grad


def test_grpo_fixture_index_is_complete(grpo_tensors):
    keys = {case["key"] for case in GRPO["cases"]}
    assert len(keys) == len(GRPO["cases"]) == 42
    for case in GRPO["cases"]:
        assert set(case["tensors"]) <= set(grpo_tensors)
        assert float(case["loss_repr"]) == case["loss"]
        assert grpo_tensors[f"{case['key']}.logits"].dtype == getattr(torch, case["dtype"])
        assert grpo_tensors[f"{case['key']}.sa_labels"].shape == (case["B"], case["M"])
        assert case["rl_config"]["sample_num"] == case["M"]
    by_name = {case["key"]: case for case in GRPO["cases"]}
    # the edge cases exercise what they are named after
    assert by_name["grpo3.clipped.float64"]["stats"]["n_clipped_active"] > 0
    assert by_name["grpo2.all_correct.float64"]["stats"]["reward_std_unbiased"] == 0.0
    assert "beta" not in by_name["grpo2.b3_m64_no_beta.float64"]["rl_config"]


@pytest.mark.parametrize("key", [case["key"] for case in GRPO["cases"]])
def test_grpo_goldens_match_the_formulas(grpo_tensors, key):
    case = next(c for c in GRPO["cases"] if c["key"] == key)
    t = {name.removeprefix(key + "."): grpo_tensors[name] for name in case["tensors"]}
    loss, grad = grpo_reference(t["logits"], t["logits_ref"], t.get("logits_old"), t["sa_labels"],
                                t["gt_labels"], case["rl_config"])
    tolerance = TOLERANCE[case["dtype"]]
    assert scaled_error(loss, case["loss"]) <= tolerance
    assert scaled_error(grad, t["grad_logits"]) <= tolerance


def test_grpo3_equals_grpo2_when_the_old_policy_is_the_policy(grpo_tensors):
    for dtype in ("float64", "float32"):
        cases = {c["function"]: c for c in GRPO["cases"] if c["case"] == "b3_m64_ref_is_policy" and c["dtype"] == dtype}
        assert cases["grpo3_loss"]["loss"] == cases["grpo2_loss"]["loss"]
        assert torch.equal(grpo_tensors[f"grpo3.b3_m64_ref_is_policy.{dtype}.grad_logits"],
                           grpo_tensors[f"grpo2.b3_m64_ref_is_policy.{dtype}.grad_logits"])


def oc_reference(weight, x, target, w_posi, w_nega, alpha):
    """OC-softmax in float64: unit weight u = w * (1e-5 / (|w| + 1e-7)) * 1e5 (torch.renorm's maxnorm 1e-5),
    cos = x.u / |x|, pos = alpha (w_posi - cos), neg = alpha (cos - w_nega), loss = mean softplus(pos if
    target == 1 else neg) with torch's softplus threshold 20; gradients in closed form (cos never reaches
    the clamp at +-1 here)."""
    w, x = weight.double()[:, 0], x.double()
    norm_w = float(w.norm())
    c = 1e-5 / (norm_w + 1e-7) * 1e5 if norm_w > 1e-5 else 1.0
    u = w * c
    norm_x = x.norm(dim=1)
    cos = (x @ u) / norm_x
    assert float(cos.abs().max()) < 1.0
    pos, neg = alpha * (w_posi - cos), alpha * (cos - w_nega)
    t = target.double()
    out = t * pos + (1 - t) * neg
    # torch's softplus is linear above its threshold 20 (value x, slope exactly 1); alpha = 20 reaches it
    # whenever a bona fide input has cos < w_posi - 1
    linear = out > 20
    loss = torch.where(linear, out, torch.log1p(out.clamp(max=20).exp())).mean()
    slope = torch.where(linear, torch.ones_like(out), torch.sigmoid(out))
    dcos = slope * torch.where(target == 1, -alpha, alpha) / len(x)
    grad_x = dcos[:, None] * (u[None, :] / norm_x[:, None] - cos[:, None] * x / norm_x[:, None] ** 2)
    g = (dcos[:, None] * x / norm_x[:, None]).sum(0)  # d loss / d u
    grad_w = c * g - (c * c) * float(g @ w) * w / norm_w if norm_w > 1e-5 else g
    return {"angle_only": torch.stack([-cos, cos], 1), "pos_score": pos[:, None], "neg_score": neg[:, None],
            "loss": float(loss), "grad_input": grad_x, "grad_weight": grad_w[:, None]}


@pytest.mark.parametrize("key", [case["key"] for case in OC["cases"]])
def test_oc_softmax_goldens_match_the_formulas(oc_tensors, key):
    case = next(c for c in OC["cases"] if c["key"] == key)
    t = {name.removeprefix(key + "."): oc_tensors[name] for name in case["tensors"]}
    assert t["weight"].shape == (case["input_features"], 1) and t["input"].dtype == getattr(torch, case["dtype"])
    assert t["target"].tolist() == case["target"]
    ref = oc_reference(t["weight"], t["input"], t["target"], **case["config"])
    tolerance = TOLERANCE[case["dtype"]]
    assert scaled_error(ref["loss"], case["loss"]) <= tolerance
    for name in ("angle_only", "pos_score", "neg_score", "grad_input", "grad_weight"):
        assert scaled_error(ref[name], t[name]) <= tolerance, name


def test_recipe_values_are_typed_and_consistent():
    recipes = HPARAMS["recipes"]
    assert len(recipes) == 24
    models = {"mms_300m", "mms_1b", "w2v_small", "w2v_large", "xlsr_1b", "xlsr_2b"}
    assert {r["model_name"] for r in recipes.values()} == models
    for stem, r in recipes.items():
        assert stem == f"{r['model_name']}_{r['kind']}"
        for key in ("lr", "eps", "weight_decay", "max_grad_norm", "decay_factor"):
            assert isinstance(r[key], float), (stem, key)
        assert r["optimizer"]["lr"] == r["lr"] and r["lr_scheduler"]["n_warmup_steps"] == r["warmup"]
        assert r["lr_scheduler"]["total_steps"] == r["optimizer_step_limit"]
        assert r["detector"]["loss"] == "softmax"
        kind = r["kind"]
        if kind == "pre-post-grpo_v1":
            assert r["rl_config"] == {"algo": "grpo3", "sample_num": 64, "std_floor": 1e-5, "beta": 0.04,
                                      "inner_step_size": 1000, "epsilon": 0.2}
            assert r["ref_detector"] == r["old_detector"] == r["model_name"]
        elif kind == "pre-post-grpo_v2":
            assert r["rl_config"] == {"algo": "grpo2", "sample_num": 64, "std_floor": 1e-5, "beta": 0.04}
            assert r["ref_detector"] == r["model_name"] and r["old_detector"] is None
        elif kind == "pre-post-sft":
            assert r["rl_config"] is None and r["ref_detector"] is None
        else:
            assert kind == "pre-post" and r["rl_config"]["algo"] is None
        if kind != "pre-post":
            assert (r["lr"], r["warmup"], r["optimizer_step_limit"], r["valid_step"]) == (1e-6, 80000, 50000, 20000)


def test_the_fixture_script_holds_no_antideepfake_code():
    source = (FIXTURES / "make_fixtures.py").read_text(encoding="utf-8")
    for marker in ("def grpo2_loss", "def grpo3_loss", "class OCAngleLayer", "def OCSoftmaxLoss", "repeat_interleave"):
        assert marker not in source
