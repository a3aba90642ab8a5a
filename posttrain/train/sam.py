"""Sharpness-aware minimisation inside a DeepSpeed engine: SAM, ASAM and LookSAM as one fused step.

One call of ``sharpness_aware_step(engine, run_pass, cfg)`` does, with ``run_pass`` running the
forward and ``engine.backward`` of every micro-batch of the step (boundary at the last one):

1. first pass at ``w`` -> reduced gradient ``g`` on this rank's partitions (``partitions``);
2. the global norm from partial sums of squares, ONE all-reduce (never a per-rank norm);
3. ``e = rho g / ||g||``; ASAM: ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta`` on parameters whose
   name contains ``weight`` (conv/linear/norm weights, the weight-norm factors of the positional
   conv) and ``T = 1`` elsewhere (biases), as in the official ASAM code (SamsungLabs/ASAM);
4. ``w += e`` in place on the owned model-side partitions with ``torch._foreach`` ops, made visible
   to the forward (ZeRO-1/2: all-gather of the owned slices; ZeRO-3: the next forward gathers the
   partitions), then ``engine.optimizer.zero_grad()`` (``partitions.discard_gradients``), after which
   the second pass's reduction overwrites the gradient buffers instead of adding to them;
5. second pass on the SAME inputs with the SAME dropout/SpecAugment draws (the Python, NumPy and
   torch RNG states are captured before pass 1 and restored before pass 2);
6. the weights restored by COPY (never by subtracting ``e``, which is not exact in bf16): from the
   optimiser's fp32 master when that is a separate tensor (ZeRO-1/2 and ZeRO-3 bf16, where
   DeepSpeed keeps the model copy equal to the rounded master, so no extra memory), else from a
   saved copy of the owned partitions (ZeRO-3 fp32 and stage 0, where the master IS the perturbed
   tensor): at most one copy of the locally owned parameters;
7. ``apply_update`` (``engine.step()``): DeepSpeed clips and applies the second-pass gradient only
   (the first was discarded in 4). A ZeRO-1/2 step skipped by DeepSpeed (overflow) ends without its
   all-gather; the replicas are then re-synchronised here.

LookSAM (Liu et al., CVPR 2022; ``sam.variant: looksam``): the full step above every
``looksam_every_steps`` steps, which also stores ``g_v = g_s - <g_s, g>/||g||^2 g`` (the part of the
SAM gradient orthogonal to the plain one) as an fp32 copy of the owned gradient partitions; the
steps between run one pass and update with ``g + alpha ||g|| / ||g_v|| g_v``. The copy is not
checkpointed: after a resume the first step is a full one.

The weights are perturbed only inside this one call, and a checkpoint written by the loop between
two calls never sees them: the step marks the engine in ``posttrain.train.perturbation``, which
checkpoint code checks (the mark also stays up if a pass raised, since the replicas may then be
inconsistent). The ascent itself (direction, perturb, restore) is ``posttrain.train.ascent``.

Fine-tune path (accelerate + DeepSpeed): ``accelerator.backward`` also calls ``engine.step()``, so
``run_pass`` must call the engine's own backward: ``engine = accelerator.deepspeed_engine_wrapped.engine``
(the prepared model is that ``DeepSpeedEngine``), ``run_pass = lambda: (l := loss(engine(x)), engine.backward(l))[0].detach()``,
then ``sharpness_aware_step(engine, run_pass, cfg.sam, step_index=step)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from posttrain.config import SamConfig
from posttrain.data.batch import Batch
from posttrain.train.ascent import ascent_direction_, perturb_, restore_, takes_ascent
from posttrain.train.partitions import (check_partitions_released, discard_gradients, global_sums, local_dot,
                                        local_sum_of_squares, owned_gradients, owned_parameters, sync_model_copies,
                                        zero_stage)
from posttrain.train.perturbation import clear_perturbed, mark_perturbed
from posttrain.train.rng import rng_state, set_rng_state
from posttrain.train.step import (StepContext, StepStats, finish_step, forward_backward, global_counts, loss_scale,
                                  prepare, register_step_mode)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

_looksam_directions: "weakref.WeakKeyDictionary[Any, list[torch.Tensor]]" = weakref.WeakKeyDictionary()


@dataclass
class SamOutcome:
    """What one ``sharpness_aware_step`` saw. Losses are this rank's values as ``run_pass`` returned them."""

    first_loss: torch.Tensor  # at w
    second_loss: torch.Tensor | None  # at w + e (None on a LookSAM reuse step)
    grad_norm: float  # global ||g|| of the first pass (ASAM: ||T g||)
    full_step: bool  # False on a LookSAM reuse step
    perturbed: bool  # False when the norm was 0 or non-finite (no ascent taken)
    update: Any = None  # what apply_update returned


# ------------------------------------------------------------------------------------------ the step


def _store_plain_gradient(engine: Any, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """LookSAM: the first-pass gradient, kept (fp32, owned partitions) to project the SAM gradient on."""
    stored = _looksam_directions.get(engine)
    if stored is None or [t.numel() for t in stored] != [g.numel() for g in grads]:
        flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.float32, device=grads[0].device if grads else None)
        stored = list(flat.split([g.numel() for g in grads]))
        _looksam_directions[engine] = stored
    torch._foreach_copy_(stored, grads)
    return stored


def _orthogonal_component_(stored: list[torch.Tensor], sam_grads: list[torch.Tensor], group: Any,
                           device: torch.device) -> None:
    """``stored`` (holding ``g``) <- ``g_s - <g_s, g>/||g||^2 g``. One all-reduce."""
    partials = torch.stack([local_dot(sam_grads, stored, device), local_sum_of_squares(stored, device)])
    dot, norm_sq = global_sums(partials, group).tolist()
    torch._foreach_mul_(stored, -dot / norm_sq if norm_sq > 0 else 0.0)
    torch._foreach_add_(stored, sam_grads)


def _reuse_orthogonal_component_(grads: list[torch.Tensor], stored: list[torch.Tensor], alpha: float, group: Any,
                                 device: torch.device) -> float:
    """LookSAM's cheap step: ``g <- g + alpha ||g||/||g_v|| g_v`` in place; returns ``||g||``. One all-reduce."""
    partials = torch.stack([local_sum_of_squares(grads, device), local_sum_of_squares(stored, device)])
    grad_sq, direction_sq = global_sums(partials, group).tolist()
    grad_norm = math.sqrt(grad_sq)
    if direction_sq > 0 and math.isfinite(grad_norm):
        torch._foreach_add_(grads, stored, alpha=alpha * grad_norm / math.sqrt(direction_sq))
    return grad_norm


def sharpness_aware_step(engine: "DeepSpeedEngine", run_pass: Callable[[], torch.Tensor], cfg: SamConfig, *,
                         step_index: int = 0,
                         apply_update: Callable[[SamOutcome], Any] | None = None) -> SamOutcome:
    """One SAM / ASAM / LookSAM optimiser step (see the module doc). Collective: every rank calls it.

    ``run_pass()`` forwards every micro-batch of the step and calls ``engine.backward`` on each (the
    accumulation boundary at the last), returning a detached loss tensor (e.g. the local loss sum).
    ``apply_update(outcome)`` takes the update once the weights are restored (default ``engine.step()``);
    its return value is ``outcome.update``. ``step_index`` (optimiser steps done so far) schedules
    LookSAM's full steps."""
    device = torch.device(engine.device)
    looksam = cfg.variant == "looksam"
    stored = _looksam_directions.get(engine) if looksam else None
    full_step = stored is None or step_index % cfg.looksam_every_steps == 0
    rng = rng_state()
    first_loss = run_pass()
    owned = owned_parameters(engine)
    grads = owned_gradients(engine)
    if not full_step:
        norm = _reuse_orthogonal_component_(grads, stored, cfg.looksam_alpha, owned.group, device)
        outcome = SamOutcome(first_loss, None, norm, full_step=False, perturbed=False)
        outcome.update = apply_update(outcome) if apply_update else engine.step()
        return outcome

    plain = _store_plain_gradient(engine, grads) if looksam else None
    norm = ascent_direction_(owned, grads, adaptive=cfg.adaptive, eta=cfg.adaptive_eta, device=device)
    perturb = takes_ascent(norm)
    saved = None
    mark_perturbed(engine, "sam")
    if perturb:
        check_partitions_released(engine)
        saved = perturb_(owned, grads, cfg.rho, norm)
        sync_model_copies(engine)
    discard_gradients(engine)
    set_rng_state(rng)  # the same dropout / SpecAugment draws as the first pass
    second_loss = run_pass()
    if perturb:
        restore_(owned, saved)
    del saved
    if plain is not None:
        _orthogonal_component_(plain, owned_gradients(engine), owned.group, device)
    outcome = SamOutcome(first_loss, second_loss, norm, full_step=True, perturbed=perturb)
    outcome.update = apply_update(outcome) if apply_update else engine.step()
    if perturb and zero_stage(engine) in (1, 2) and getattr(engine.optimizer, "overflow", False):
        sync_model_copies(engine)  # the skipped step did not all-gather the restored slices
    clear_perturbed(engine)
    return outcome


# ------------------------------------------------------------------------------------ the step mode


@register_step_mode("sam")
def sam_step(engine: "DeepSpeedEngine", micro_batches: list[Batch], ctx: StepContext) -> StepStats:
    """The ``sam`` step mode (``sam.enabled``): cross-entropy as in ``plain``, the update from the
    gradient at ``w + e``. Extras: ``sam/grad_norm`` (first pass), ``sam/loss_increase``
    (mean L(w + e) - L(w) over the step's samples) and ``sam/full_step`` (LookSAM)."""
    batches = prepare(ctx, micro_batches)  # augmented once: both passes see the same waveforms
    samples, seconds = global_counts(ctx, batches)
    scale = loss_scale(ctx, samples)

    def run_pass() -> torch.Tensor:
        return forward_backward(engine, batches, scale, ctx)

    def apply_update(outcome: SamOutcome) -> StepStats:
        # the reported loss is L(w); a non-finite L(w + e) (0 x inf = NaN) still makes every rank skip
        loss = outcome.first_loss if outcome.second_loss is None else outcome.first_loss + 0.0 * outcome.second_loss
        extra = {"sam/grad_norm": outcome.grad_norm, "sam/full_step": float(outcome.full_step)}
        # mean L(w + e) - L(w) over the step's samples, reduced in finish_step's one collective
        sums = {} if outcome.second_loss is None else {"sam/loss_increase": outcome.second_loss - outcome.first_loss}
        return finish_step(engine, ctx, loss, samples, seconds, extra, sums)

    outcome = sharpness_aware_step(engine, run_pass, ctx.cfg.sam, step_index=ctx.step, apply_update=apply_update)
    return outcome.update
