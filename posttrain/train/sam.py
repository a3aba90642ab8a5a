"""Sharpness-aware minimisation inside a DeepSpeed engine: SAM, ASAM, LookSAM and ESAM as one fused step.

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
steps between run one pass and update with ``g + alpha ||g|| / ||g_v|| g_v``. The copy lives in the
step's memory (``StepContext.scratch``), not in module state, and is not
checkpointed: after a resume the first step is a full one.

ESAM (Du et al., ICLR 2022; ``sam.variant: esam``, ``esam_step``), the same steps 1-7 with two savings:
stochastic weight perturbation, ``e = rho (m * d) / (beta ||d||)`` with ``d`` the SAM/ASAM direction
and ``m`` a Bernoulli(``beta = esam_weight_fraction``) mask per weight element (a hash of the element's
index in its parameter, the parameter's name, ``train.seed`` and the step: the same mask however the
model is sharded); and sharpness-sensitive data selection: a forward without gradient at ``w + e``
gives every sample's loss increase, and the second pass (forward and backward) runs only on the
``ceil(gamma N)`` samples of the global step whose loss rose most (``gamma = esam_data_fraction``; one
all-gather of the increases; ties to the earlier sample in (rank, micro-batch, row) order), its loss the
mean over them. A micro-batch left without a selected sample runs as a join batch.

The weights are perturbed only inside this one call, and a checkpoint written by the loop between
two calls never sees them: the step marks the engine in ``posttrain.train.perturbation``, which
checkpoint code checks (the mark also stays up if a pass raised, since the replicas may then be
inconsistent). The ascent itself (direction, perturb, restore) is ``posttrain.optim.ascent``.

Fine-tune path (accelerate + DeepSpeed): ``accelerator.backward`` also calls ``engine.step()``, so
``run_pass`` must call the engine's own backward: ``engine = accelerator.deepspeed_engine_wrapped.engine``
(the prepared model is that ``DeepSpeedEngine``), ``run_pass = lambda: (l := loss(engine(x)), engine.backward(l))[0].detach()``,
then ``sharpness_aware_step(engine, run_pass, cfg.sam, step_index=step)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from posttrain.config import SamConfig
from posttrain.data.batch import Batch
from posttrain.optim.ascent import ascent_direction_, perturb_, restore_, takes_ascent
from posttrain.dist import dist_info, gather_vectors, global_sums
from posttrain.optim.partitions import (OwnedParameters, check_partitions_released, discard_gradients, flat_copy,
                                        local_dot, local_sum_of_squares, owned_gradients, owned_parameters,
                                        sync_model_copies, zero_stage)
from posttrain.train.perturbation import clear_perturbed, mark_perturbed
from posttrain.train.rng import rng_state, set_rng_state
from posttrain.train.step import (StepContext, StepStats, finish_step, forward_backward, global_counts, loss_scale,
                                  micro_loss, prepare, register_step_mode, sample_losses)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

LOOKSAM_DIRECTION = "looksam_direction"  # key of the stored g_v in the step's memory (``StepContext.scratch``)


@dataclass
class SamOutcome:
    """What one ``sharpness_aware_step`` saw. Losses are this rank's values as ``run_pass`` returned them."""

    first_loss: torch.Tensor  # at w
    second_loss: torch.Tensor | None  # at w + e (None on a LookSAM reuse step)
    grad_norm: float  # global ||g|| of the first pass (ASAM: ||T g||)
    full_step: bool  # False on a LookSAM reuse step
    perturbed: bool  # False when the norm was 0 or non-finite (no ascent taken)
    update: StepStats | None = None  # what apply_update returned (the step mode's StepStats)


# ------------------------------------------------------------------------------------------ the step


def _store_plain_gradient(memory: dict[str, Any], grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """LookSAM: the first-pass gradient, kept (fp32, owned partitions) to project the SAM gradient on."""
    memory[LOOKSAM_DIRECTION] = flat_copy(grads, torch.float32, into=memory.get(LOOKSAM_DIRECTION))
    return memory[LOOKSAM_DIRECTION]


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


def _ascend(engine: "DeepSpeedEngine", owned: OwnedParameters, grads: list[torch.Tensor], cfg: SamConfig,
            device: torch.device, mode: str, thin_: Callable[[], None] | None = None) -> tuple[float, bool, Any]:
    """Move the owned partitions to ``w + e`` along the first-pass gradient (the SAM or ASAM direction;
    ``thin_`` first masks it, ESAM's stochastic weight perturbation), then drop that gradient for the
    second pass. Returns the direction's global norm, whether an ascent was taken, and what
    ``restore_`` needs."""
    norm = ascent_direction_(owned, grads, adaptive=cfg.adaptive, eta=cfg.adaptive_eta, device=device)
    perturb = takes_ascent(norm)
    saved = None
    mark_perturbed(engine, mode)
    if perturb:
        check_partitions_released(engine)
        if thin_ is not None:
            thin_()
        saved = perturb_(owned, grads, cfg.rho, norm)
        sync_model_copies(engine)
    discard_gradients(engine)
    return norm, perturb, saved


def sharpness_aware_step(engine: "DeepSpeedEngine", run_pass: Callable[[], torch.Tensor], cfg: SamConfig, *,
                         step_index: int = 0, apply_update: Callable[[SamOutcome], Any] | None = None,
                         memory: dict[str, Any] | None = None) -> SamOutcome:
    """One SAM / ASAM / LookSAM optimiser step (see the module doc). Collective: every rank calls it.

    ``run_pass()`` forwards every micro-batch of the step and calls ``engine.backward`` on each (the
    accumulation boundary at the last), returning a detached loss tensor (e.g. the local loss sum).
    ``apply_update(outcome)`` takes the update once the weights are restored (default ``engine.step()``);
    its return value is ``outcome.update``. ``step_index`` (optimiser steps done so far) schedules
    LookSAM's full steps; ``memory`` (the step mode's ``StepContext.scratch`` entry) keeps LookSAM's
    direction from one call to the next (None: every call is a full step)."""
    device = torch.device(engine.device)
    looksam = cfg.variant == "looksam"
    memory = {} if memory is None else memory
    stored = memory.get(LOOKSAM_DIRECTION) if looksam else None
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

    plain = _store_plain_gradient(memory, grads) if looksam else None
    norm, perturb, saved = _ascend(engine, owned, grads, cfg, device, "sam")
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


# ------------------------------------------------------------------------------------------- ESAM

_MASK_BITS = (1 << 31) - 1  # the element hash works on 31-bit integers: every product fits in int64
_MASK_CHUNK = 1 << 16  # elements hashed at a time (1 MiB of int64 scratch, stays in cache)


def _mask_key(seed: int, step_index: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{step_index}:{name}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & _MASK_BITS


def keep_mask(key: int, offset: int, numel: int, fraction: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(``fraction``) draws for elements ``offset .. offset + numel - 1`` of one parameter: a
    counter-based integer hash of (element index + ``key``), so any slice of a parameter gets its own
    part of the same mask without drawing the rest. Hashed in cache-sized chunks with in-place ops:
    a few int64 passes per element (as cheap as one more elementwise op on the weights)."""
    out = torch.empty(numel, dtype=torch.bool, device=device)
    threshold = int(fraction * (_MASK_BITS + 1))
    base = torch.arange(min(numel, _MASK_CHUNK), dtype=torch.int64, device=device)
    x, shifted = torch.empty_like(base), torch.empty_like(base)
    for start in range(0, numel, _MASK_CHUNK):
        count = min(_MASK_CHUNK, numel - start)
        h, t = x[:count], shifted[:count]
        torch.add(base[:count], offset + start + key, out=h)
        h.bitwise_and_(_MASK_BITS).mul_(1103515245).add_(12345).bitwise_and_(_MASK_BITS)  # an LCG step
        torch.bitwise_right_shift(h, 15, out=t)  # then xorshift-multiply-xorshift: low bits into high ones
        h.bitwise_xor_(t).mul_(0x2C1B3C6D).bitwise_and_(_MASK_BITS)
        torch.bitwise_right_shift(h, 16, out=t)
        h.bitwise_xor_(t)
        torch.lt(h, threshold, out=out[start:start + count])
    return out


def stochastic_weight_mask_(owned: OwnedParameters, direction: list[torch.Tensor], fraction: float, seed: int,
                            step_index: int) -> None:
    """ESAM's SWP: ``d <- m * d / fraction`` in place (``m`` from ``keep_mask``; unbiased: E[m d / beta] = d)."""
    if fraction >= 1.0:
        return
    for index, (name, d) in enumerate(zip(owned.names, direction)):
        mask = keep_mask(_mask_key(seed, step_index, name), owned.offset(index), d.numel(), fraction, d.device)
        d.mul_(mask.to(d.dtype)).div_(fraction)


def select_sharpest(increases: list[torch.Tensor], fraction: float) -> tuple[list[torch.Tensor], int]:
    """ESAM's SDS over the GLOBAL step: per micro-batch, the rows of this rank among the
    ``ceil(fraction N)`` samples whose loss rose most (ties: the earlier in (rank, micro-batch, row)
    order), and the global number selected. Collective (``gather_vectors``)."""
    local = torch.cat(increases).double() if increases else torch.zeros(0, dtype=torch.float64)
    every_rank = gather_vectors(local)
    rank = dist_info().rank
    start = sum(v.numel() for v in every_rank[:rank])
    values = torch.cat(every_rank)
    count = math.ceil(fraction * values.numel())
    # descending by increase, stable: equal increases keep their global order
    order = torch.sort(-values.nan_to_num(nan=-math.inf), stable=True).indices[:count]
    chosen = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    chosen[order] = True
    mine = chosen[start:start + local.numel()]
    rows, offset = [], 0
    for part in increases:
        rows.append(torch.nonzero(mine[offset:offset + part.numel()]).flatten().cpu())
        offset += part.numel()
    return rows, count


def rows_of(batch: Batch, rows: torch.Tensor) -> Batch:
    """The selected rows of a batch, cut to their longest (an empty selection: a join batch)."""
    if rows.numel() == 0:
        return Batch.empty().to(batch.waveforms.device)
    keep = rows.tolist()
    lengths = batch.lengths[rows.to(batch.lengths.device)]
    width = int(lengths.max())
    index = rows.to(batch.waveforms.device)
    return Batch(batch.waveforms[index, :width], lengths, batch.labels[index],
                 *([column[i] for i in keep] if column else [] for column in (batch.ids, batch.meta, batch.repeats)))


def forward_losses(engine: "DeepSpeedEngine", batches: list[Batch], ctx: StepContext) -> list[torch.Tensor]:
    """Per-sample cross-entropy of every micro-batch, forward only (join batches still forward, so
    ZeRO-3's parameter gathers stay in lockstep across ranks)."""
    with torch.no_grad():
        return [micro_loss(engine, batch, 0.0, ctx)[1] for batch in batches]


def esam_step(engine: "DeepSpeedEngine", batches: list[Batch], ctx: StepContext) -> StepStats:
    """One ESAM optimiser step on prepared micro-batches (see the module doc). Collective."""
    cfg = ctx.cfg.sam
    device = ctx.device
    samples, seconds = global_counts(ctx, batches)
    rng = rng_state()
    first = sample_losses(engine, batches, loss_scale(ctx, samples), ctx)
    owned = owned_parameters(engine)
    grads = owned_gradients(engine)
    norm, perturb, saved = _ascend(
        engine, owned, grads, cfg, device, "esam",
        thin_=lambda: stochastic_weight_mask_(owned, grads, cfg.esam_weight_fraction, ctx.cfg.train.seed, ctx.step))
    set_rng_state(rng)
    increases = [after - before for after, before in zip(forward_losses(engine, batches, ctx), first)]
    rows, selected = select_sharpest(increases, cfg.esam_data_fraction)
    set_rng_state(rng)
    subsets = [rows_of(batch, keep) for batch, keep in zip(batches, rows)]
    second = forward_backward(engine, subsets, loss_scale(ctx, selected), ctx)
    if perturb:
        restore_(owned, saved)
    del saved
    loss = torch.cat(first).double().sum() + 0.0 * second  # L(w) reported; a non-finite L(w + e) still skips
    extra = {"sam/grad_norm": norm, "sam/full_step": 1.0,
             "esam/selected_fraction": selected / samples if samples else 0.0}
    # mean L(w + e) - L(w) over the step's samples, reduced in finish_step's one collective
    sums = {"sam/loss_increase": torch.cat(increases).double().sum()}
    stats = finish_step(engine, ctx, loss, samples, seconds, extra, sums)
    if perturb and zero_stage(engine) in (1, 2) and getattr(engine.optimizer, "overflow", False):
        sync_model_copies(engine)  # the skipped step did not all-gather the restored slices
    clear_perturbed(engine)
    return stats


# ------------------------------------------------------------------------------------ the step mode


@register_step_mode("sam")
def sam_step(engine: "DeepSpeedEngine", micro_batches: list[Batch], ctx: StepContext) -> StepStats:
    """The ``sam`` step mode (``sam.enabled``): cross-entropy as in ``plain``, the update from the
    gradient at ``w + e``. Extras: ``sam/grad_norm`` (first pass), ``sam/loss_increase``
    (mean L(w + e) - L(w) over the step's samples) and ``sam/full_step`` (LookSAM)."""
    batches = prepare(ctx, micro_batches)  # augmented once: both passes see the same waveforms
    if ctx.cfg.sam.variant == "esam":
        return esam_step(engine, batches, ctx)
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

    outcome = sharpness_aware_step(engine, run_pass, ctx.cfg.sam, step_index=ctx.step, apply_update=apply_update,
                                   memory=ctx.scratch.setdefault("sam", {}))
    return outcome.update
