"""Gradient alignment for dual-path (clean + augmented) training on possibly sharded gradients.

With ``g_c`` the clean-path and ``g_a`` the augmented-path gradient (flattened over all trainable
parameters), every method here returns ``g = a_c * g_c + a_a * g_a`` whose coefficients depend only
on three global scalars ``<g_c, g_a>``, ``||g_c||^2`` and ``||g_a||^2``. So each rank:

1. computes its partial scalars over the gradient elements it owns (``partial_products``),
2. sums them across ranks with ONE all-reduce of a 3-element tensor over the group whose
   partitions tile the gradient (``posttrain.dist.global_sums``; none when one rank holds it all),
3. gets the coefficients (``GradientAligner.coefficients``) and combines its own elements in place
   (``combine_``).

``GradientAligner.align_`` does the three steps (the dual-path step mode calls it). Methods (two tasks, reduction = mean as in DPDA):

* ``pcgrad`` (Yu et al., 2020): when ``<g_c, g_a> < 0`` each gradient drops its component along the
  other, ``g_c' = g_c - <g_c,g_a>/||g_a||^2 g_a`` (and symmetrically); ``g = (g_c' + g_a') / 2``.
* ``gradvac`` (Wang et al., 2021): when the cosine ``rho`` is below an EMA target ``phi`` (starting at
  0), each gradient adds a multiple of the other that lifts their cosine to ``phi``:
  ``g_c' = g_c + ||g_c|| (phi sqrt(1-rho^2) - rho sqrt(1-phi^2)) / (||g_a|| sqrt(1-phi^2)) g_a``;
  then ``phi <- (1 - beta) phi + beta rho`` (DPDA's code: only when ``rho > 0``).
* ``cagrad`` (Liu et al., 2021): with ``g_0 = (g_c + g_a) / 2`` and ``g_w = w g_c + (1 - w) g_a``,
  ``w* = argmin_{w in [0,1]} <g_w, g_0> + c ||g_0|| ||g_w||`` (closed form below), then
  ``g = (g_0 + c ||g_0|| / ||g_w*|| g_w*) / (1 + c^2)``.
* ``sum`` (``g_c + g_a``) and ``mean`` (``(g_c + g_a) / 2``): no alignment.

The small epsilons follow the DPDA reference code (ductuantruong/dpda_ga) so results match it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from posttrain.config import DualPathConfig
from posttrain.dist import global_sums

METHODS = ("pcgrad", "gradvac", "cagrad", "sum", "mean")
EPS = 1e-8  # the reference code's guard in every denominator

# ------------------------------------------------------------------------------ global scalars


def partial_products(grads_clean: Sequence[torch.Tensor], grads_aug: Sequence[torch.Tensor],
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``[<g_c, g_a>, ||g_c||^2, ||g_a||^2]`` (float64) over the given tensors: this rank's share of the
    global scalars, on ``device`` (default: the gradients', CPU for an empty share; NCCL needs the GPU).
    Low-precision gradients accumulate in fp32."""
    if len(grads_clean) != len(grads_aug):
        raise ValueError(f"align: {len(grads_clean)} clean gradient tensors vs {len(grads_aug)} augmented")
    for i, (c, a) in enumerate(zip(grads_clean, grads_aug)):
        if c.shape != a.shape:
            raise ValueError(f"align: tensor {i} has shape {tuple(c.shape)} (clean) "
                             f"vs {tuple(a.shape)} (augmented)")
    if not grads_clean:
        return torch.zeros(3, dtype=torch.float64, device=device)
    acc = torch.float64 if grads_clean[0].dtype == torch.float64 else torch.float32
    dots = torch.stack([torch.dot(c.reshape(-1).to(acc), a.reshape(-1).to(acc))
                        for c, a in zip(grads_clean, grads_aug)])
    norms_c = torch.stack(torch._foreach_norm(list(grads_clean), 2, dtype=acc))
    norms_a = torch.stack(torch._foreach_norm(list(grads_aug), 2, dtype=acc))
    products = torch.stack([dots.double().sum(), norms_c.double().square().sum(), norms_a.double().square().sum()])
    return products if device is None else products.to(device)


# ------------------------------------------------------------------------------- coefficients


@dataclass
class AlignStats:
    """What one alignment did: the global scalars, the cosine, and ``g = coef_clean g_c + coef_aug g_a``.

    ``conflict``: ``<g_c, g_a> < 0``; ``adjusted``: the result differs from the method's plain
    reduction (``mean``; ``sum`` for ``sum``); ``target_cosine``: GradVac's EMA target after the step.
    """

    method: str
    dot: float
    norm_clean: float
    norm_aug: float
    cosine: float
    conflict: bool
    adjusted: bool
    coef_clean: float
    coef_aug: float
    target_cosine: float | None = None


def pcgrad_coefficients(dot: float, sq_clean: float, sq_aug: float) -> tuple[float, float]:
    if dot >= 0:
        return 0.5, 0.5
    # g_c' = g_c - dot/||g_a||^2 g_a and g_a' = g_a - dot/||g_c||^2 g_c, averaged.
    return 0.5 * (1 - dot / sq_clean), 0.5 * (1 - dot / sq_aug)


def gradvac_coefficients(dot: float, sq_clean: float, sq_aug: float, target: float) -> tuple[float, float]:
    norm_c, norm_a = math.sqrt(sq_clean), math.sqrt(sq_aug)
    rho = dot / (norm_c * norm_a + EPS)
    if rho >= target:
        return 0.5, 0.5
    # With two tasks both directions see the same cosine and (as both EMAs start at 0 and get the
    # same updates) the same target, so one target serves both.
    lift = target * math.sqrt(max(0.0, 1 - rho * rho)) - rho * math.sqrt(max(0.0, 1 - target * target))
    slack = math.sqrt(max(0.0, 1 - target * target))
    weight_c = norm_c * lift / (norm_a * slack + EPS)  # g_c' = g_c + weight_c g_a
    weight_a = norm_a * lift / (norm_c * slack + EPS)  # g_a' = g_a + weight_a g_c
    return 0.5 * (1 + weight_a), 0.5 * (1 + weight_c)


def cagrad_weight(dot: float, sq_clean: float, sq_aug: float, c_scaled: float) -> float:
    """``argmin_{w in [0,1]} f(w) = <g_w, g_0> + c_scaled ||g_w||``, ``g_w = w g_c + (1-w) g_a``.

    f is convex. With ``u = g_c - g_a``: ``<g_w, g_0> = const + p w`` and
    ``||g_w||^2 = (q + r w)^2 / r + D`` where ``p = <u, g_0>``, ``q = <g_a, u>``, ``r = ||u||^2`` and
    ``D = (||g_c||^2 ||g_a||^2 - <g_c,g_a>^2) / r >= 0``. Writing ``t = q + r w``, ``f'(w) = 0`` reads
    ``c t = -p sqrt(D + t^2 / r)``: ``t = -sign(p) |p| sqrt(D / (c^2 - p^2 / r))`` when
    ``c^2 > p^2 / r``; otherwise f is monotone (sign of p) and the minimum is at an end.
    """
    p = (sq_clean - sq_aug) / 2
    q = dot - sq_aug
    r = sq_clean - 2 * dot + sq_aug
    if r <= 0:  # g_c == g_a: every w gives the same g_w
        return 0.5
    room = c_scaled * c_scaled - p * p / r
    if room <= 0:
        return 0.0 if p > 0 else 1.0
    spread = max(0.0, sq_clean * sq_aug - dot * dot) / r
    t = -math.copysign(math.sqrt(p * p * spread / room), p)
    return min(1.0, max(0.0, (t - q) / r))


def cagrad_coefficients(dot: float, sq_clean: float, sq_aug: float, c: float) -> tuple[float, float]:
    norm_0 = math.sqrt((sq_clean + sq_aug + 2 * dot) / 4 + EPS)
    c_scaled = c * norm_0 + EPS
    w = cagrad_weight(dot, sq_clean, sq_aug, c_scaled)
    norm_w = math.sqrt(max(0.0, w * w * sq_clean + 2 * w * (1 - w) * dot + (1 - w) ** 2 * sq_aug))
    lam = c_scaled / (norm_w + EPS)
    return (0.5 + lam * w) / (1 + c * c), (0.5 + lam * (1 - w)) / (1 + c * c)


# --------------------------------------------------------------------------------------- apply


def combine_(grads_clean: Sequence[torch.Tensor], grads_aug: Sequence[torch.Tensor], coef_clean: float,
             coef_aug: float, into: Literal["clean", "aug"] = "clean") -> Sequence[torch.Tensor]:
    """``coef_clean * g_c + coef_aug * g_a`` written in place into ``grads_clean`` (or ``grads_aug``)."""
    if into == "clean":
        target, other, scale, alpha = grads_clean, grads_aug, coef_clean, coef_aug
    elif into == "aug":
        target, other, scale, alpha = grads_aug, grads_clean, coef_aug, coef_clean
    else:
        raise ValueError(f"align: into must be 'clean' or 'aug', got {into!r}")
    target = list(target)
    if target:
        torch._foreach_mul_(target, scale)
        torch._foreach_add_(target, list(other), alpha=alpha)
    return target


class GradientAligner:
    """Combines clean and augmented gradients; holds GradVac's EMA target (checkpoint its state)."""

    def __init__(self, method: str = "pcgrad", gradvac_beta: float = 0.5, cagrad_c: float = 0.5,
                 gradvac_ema_positive_only: bool = True):
        if method not in METHODS:
            raise ValueError(f"align: method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.gradvac_beta = gradvac_beta
        self.cagrad_c = cagrad_c
        self.gradvac_ema_positive_only = gradvac_ema_positive_only
        self.target_cosine = 0.0
        self.steps = 0

    @classmethod
    def from_config(cls, cfg: DualPathConfig) -> "GradientAligner":
        return cls(cfg.method, cfg.gradvac_beta, cfg.cagrad_c, cfg.gradvac_ema_positive_only)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "target_cosine": self.target_cosine, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.method) != self.method:
            raise ValueError(f"align: state is for method {state['method']!r}, aligner uses {self.method!r}")
        self.target_cosine = float(state["target_cosine"])
        self.steps = int(state["steps"])

    def coefficients(self, products: torch.Tensor | Sequence[float]) -> AlignStats:
        """Coefficients from the GLOBAL ``[<g_c,g_a>, ||g_c||^2, ||g_a||^2]``; advances GradVac's EMA."""
        dot, sq_c, sq_a = (float(v) for v in (products.tolist() if torch.is_tensor(products) else products))
        if not all(math.isfinite(v) for v in (dot, sq_c, sq_a)):
            raise FloatingPointError(f"align: non-finite gradient products {[dot, sq_c, sq_a]}")
        norm_c, norm_a = math.sqrt(sq_c), math.sqrt(sq_a)
        cosine = dot / (norm_c * norm_a) if norm_c > 0 and norm_a > 0 else 0.0
        plain = (1.0, 1.0) if self.method == "sum" else (0.5, 0.5)
        target = None
        if self.method == "pcgrad":
            coefs = pcgrad_coefficients(dot, sq_c, sq_a)
        elif self.method == "gradvac":
            coefs = gradvac_coefficients(dot, sq_c, sq_a, self.target_cosine)
            rho = dot / (norm_c * norm_a + EPS)
            if rho > 0 or not self.gradvac_ema_positive_only:
                self.target_cosine = (1 - self.gradvac_beta) * self.target_cosine + self.gradvac_beta * rho
            target = self.target_cosine
        elif self.method == "cagrad":
            coefs = cagrad_coefficients(dot, sq_c, sq_a, self.cagrad_c)
        else:
            coefs = plain
        self.steps += 1
        return AlignStats(self.method, dot, norm_c, norm_a, cosine, dot < 0, coefs != plain,
                          coefs[0], coefs[1], target)

    def align_(self, grads_clean: Sequence[torch.Tensor], grads_aug: Sequence[torch.Tensor], group: Any,
               device: torch.device | str | None = None) -> AlignStats | None:
        """``grads_aug <- coef_c g_c + coef_a g_a`` in place on this rank's elements, the coefficients from
        the GLOBAL products summed over ``group`` (the ranks whose partitions tile the gradient, e.g.
        ZeRO-1/2/3; None: these lists are the whole gradient). Collective: one all-reduce of three
        scalars; every rank of ``group`` calls it, with empty lists if it owns no elements (then pass
        ``device`` for the collective's tensor).

        Returns None, touching nothing (no EMA move), when the products are not finite: the caller then
        makes every rank skip the update."""
        products = global_sums(partial_products(grads_clean, grads_aug, device), group)
        if not bool(torch.isfinite(products).all()):
            return None
        stats = self.coefficients(products)
        combine_(grads_clean, grads_aug, stats.coef_clean, stats.coef_aug, into="aug")
        return stats
