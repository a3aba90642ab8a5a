"""The sharpness-aware ascent on owned partitions: direction, perturbation and exact restore.

Shared by the SAM family of step modes (``posttrain.train.sam``, inside a DeepSpeed engine) and by
m-sharpness measurement (``posttrain.eval.sharpness``, a single-process model seen as one partition
through ``module_parameters``), so both take the same step ``e = rho g / ||g||`` (ASAM:
``e = rho T^2 g / ||T g||`` with ``T = |w| + eta`` on parameters whose name contains ``weight``,
``T = 1`` elsewhere, as in the official ASAM code, SamsungLabs/ASAM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from posttrain.dist import global_sums
from posttrain.optim.partitions import OwnedParameters, local_sum_of_squares

NORM_EPS = 1e-12  # added to the norm as in the reference SAM/ASAM code
CHUNK_NUMEL = 1 << 24  # ASAM's |w| + eta is built per chunk of this many elements, not for the whole model


def module_parameters(model: nn.Module) -> tuple[OwnedParameters, list[torch.Tensor]]:
    """A single-process model as ``OwnedParameters`` (it owns everything) with its current gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    views = [p.detach().view(-1) for _, p in named]
    owned = OwnedParameters(stage=0, names=[n for n, _ in named], model=views, master=views, group=None)
    return owned, [p.grad.detach().view(-1) for _, p in named]


def _weight_indices(names: Sequence[str]) -> list[int]:
    return [i for i, name in enumerate(names) if "weight" in name]


def _chunks(indices: list[int], sizes: Sequence[int]) -> list[list[int]]:
    chunks, current, numel = [], [], 0
    for i in indices:
        if current and numel + sizes[i] > CHUNK_NUMEL:
            chunks.append(current)
            current, numel = [], 0
        current.append(i)
        numel += sizes[i]
    return chunks + ([current] if current else [])


def _scale_by_t_(owned: OwnedParameters, grads: list[torch.Tensor], eta: float) -> None:
    """``g <- T g`` in place, ``T = |w| + eta`` (fp32) on the weight tensors, chunk by chunk."""
    indices = _weight_indices(owned.names)
    for chunk in _chunks(indices, [t.numel() for t in owned.model]):
        t = [w.abs().to(torch.promote_types(w.dtype, torch.float32)) for w in (owned.model[i] for i in chunk)]
        torch._foreach_add_(t, eta)
        torch._foreach_mul_([grads[i] for i in chunk], t)


def ascent_direction_(owned: OwnedParameters, grads: list[torch.Tensor], *, adaptive: bool, eta: float,
                      device: torch.device) -> float:
    """Turn ``grads`` (the owned reduced gradient) into the unnormalised ascent direction in place
    (SAM: ``g``; ASAM: ``T^2 g``) and return the global norm that normalises it (``||g||`` / ``||T g||``).
    One all-reduce."""
    if adaptive:
        _scale_by_t_(owned, grads, eta)
    norm = math.sqrt(float(global_sums(local_sum_of_squares(grads, device), owned.group)))
    if adaptive:
        _scale_by_t_(owned, grads, eta)
    return norm


def takes_ascent(norm: float) -> bool:
    """A zero or non-finite norm gives no direction: the weights stay at ``w``."""
    return math.isfinite(norm) and norm > 0


def perturb_(owned: OwnedParameters, direction: list[torch.Tensor], rho: float,
             norm: float) -> list[torch.Tensor] | None:
    """``w <- w + rho d / (norm + eps)`` in place on the owned model tensors. Returns the copy to restore
    from when the optimiser's master IS the model tensor (stage 0, ZeRO-3 fp32), else None (restore
    from the master, which DeepSpeed keeps equal to the rounded model copy: no extra memory)."""
    saved = [t.clone() for t in owned.model] if owned.master_aliases_model else None
    torch._foreach_add_(owned.model, direction, alpha=rho / (norm + NORM_EPS))
    return saved


def restore_(owned: OwnedParameters, saved: list[torch.Tensor] | None) -> None:
    """Back to ``w`` by COPY (never by subtracting ``e``, which is not exact in bf16)."""
    torch._foreach_copy_(owned.model, saved if saved is not None else owned.master)
