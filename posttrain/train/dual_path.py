"""Dual-path data augmentation with gradient alignment (DPDA; Truong et al., ICASSP 2026) as a step mode.

Every micro-batch of the step runs twice, clean and RawBoost-augmented (``dual_path.rawboost_algo``,
drawn once per read from ``(rawboost.seed, id, epoch, repeat)``), one cross-entropy each, and the two
gradients are kept apart until one update:

1. clean pass over all micro-batches (``engine.backward``, boundary at the last): the reduced clean
   gradient sits in this rank's owned partitions (``partitions.owned_gradients``);
2. one copy of those partitions (the mode's only memory overhead: one gradient partition per rank);
3. ``partitions.discard_gradients`` (as in SAM): the augmented pass's reduction then overwrites the
   buffers instead of adding to them;
4. augmented pass: the reduced augmented gradient lands in the same buffers;
5. ``GradientAligner`` (``posttrain.train.align``) over the WHOLE flattened gradient of all trainable
   parameters: the partial ``[<g_c,g_a>, ||g_c||^2, ||g_a||^2]`` of every rank summed by ONE
   all-reduce over the partition group, then ``coef_c g_c + coef_a g_a`` element-wise, written into
   the buffers ``engine.step()`` reads;
6. ``finish_step``: DeepSpeed clips the combined gradient and steps; every rank skips together when a
   loss (clean or augmented) or the gradient products are non-finite.

Logged (``StepStats.extra``, prefix ``dual_path/``) every step: the cosine between the two gradients,
whether they conflicted (``<g_c, g_a> < 0``), whether the method changed the plain mean, the two
norms, the augmented loss, and the running conflict rate. The running counts and GradVac's EMA target
live in ``ctx.state["dual_path"]``, which the engine checkpoints, so a resumed run continues them.

The clean path is never augmented: with ``dual_path`` on, ``rawboost.enabled`` (the single-path
augmentation hook ``ctx.augment``) is ignored; the ``rawboost.*`` parameters other than ``algo`` and
``enabled`` shape the augmented path's RawBoost.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from posttrain.data.batch import Batch
from posttrain.train.align import AlignStats, GradientAligner
from posttrain.optim.partitions import discard_gradients, flat_copy, owned_gradients, owned_parameters
from posttrain.train.step import (StepContext, StepStats, finish_step, forward_backward, global_counts, loss_scale,
                                  model_inputs, register_step_mode)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

log = logging.getLogger(__name__)

Augment = Callable[[Batch, int], Batch]  # (raw batch on the device, epoch) -> augmented raw batch
STATE_KEY = "dual_path"


# ------------------------------------------------------------------------------------------- inputs


def path_augment(ctx: StepContext) -> Augment:
    """The augmented path's RawBoost: ``rawboost.*`` parameters with ``dual_path.rawboost_algo``."""
    from posttrain.augment.rawboost import RawBoost

    return RawBoost(ctx.cfg.rawboost, algo=ctx.cfg.dual_path.rawboost_algo)


def dual_inputs(ctx: StepContext, micro_batches: list[Batch], augment: Augment) -> tuple[list[Batch], list[Batch]]:
    """(clean, augmented) model inputs of the step's micro-batches: on the device, the augmented copy
    drawn from the raw audio (RawBoost assumes waveforms in [-1, 1]), then both normalised."""
    raw = [batch.to(ctx.device) for batch in micro_batches]
    augmented = [model_inputs(augment(batch, ctx.epoch), ctx.input_eps) for batch in raw]
    # ``to`` builds a new Batch, so normalising it leaves ``raw`` (and an identity augment's output) alone
    clean = [model_inputs(batch.to(ctx.device), ctx.input_eps) for batch in raw]
    return clean, augmented


# ---------------------------------------------------------------------------------------- bookkeeping


class ConflictTracker:
    """Running conflict counts and the aligner's state, kept JSON-serialisable in ``ctx.state``."""

    def __init__(self, ctx: StepContext):
        self.ctx = ctx
        self.aligner = GradientAligner.from_config(ctx.cfg.dual_path)
        state = ctx.state.get(STATE_KEY, {})
        self.aligned_steps = int(state.get("aligned_steps", 0))
        self.conflicts = int(state.get("conflicts", 0))
        saved = state.get("aligner")
        if saved is not None and saved.get("method") == self.aligner.method:
            self.aligner.load_state_dict(saved)
        elif saved is not None:
            log.warning("dual_path: checkpointed aligner state is for method %r, now %r: starting it afresh",
                        saved.get("method"), self.aligner.method)

    @property
    def conflict_rate(self) -> float:
        return self.conflicts / self.aligned_steps if self.aligned_steps else float("nan")

    def record(self, stats: AlignStats) -> None:
        self.aligned_steps += 1
        self.conflicts += int(stats.conflict)
        self.ctx.state[STATE_KEY] = {"aligned_steps": self.aligned_steps, "conflicts": self.conflicts,
                                     "aligner": self.aligner.state_dict()}


def step_extras(stats: AlignStats | None, tracker: ConflictTracker) -> dict[str, float]:
    """What the step logs (with ``dual_path/loss_aug``, the augmented loss's mean that ``finish_step``
    reduces); the alignment entries are NaN on a step whose gradients were not finite."""
    nan = float("nan")
    extra = {"dual_path/conflict_rate": tracker.conflict_rate,
             "dual_path/aligned_steps": float(tracker.aligned_steps)}
    if stats is None:
        return {**extra, "dual_path/cosine": nan, "dual_path/conflict": nan, "dual_path/adjusted": nan}
    extra.update({"dual_path/cosine": stats.cosine, "dual_path/conflict": float(stats.conflict),
                  "dual_path/adjusted": float(stats.adjusted), "dual_path/grad_norm_clean": stats.norm_clean,
                  "dual_path/grad_norm_aug": stats.norm_aug, "dual_path/coef_clean": stats.coef_clean,
                  "dual_path/coef_aug": stats.coef_aug})
    if stats.target_cosine is not None:
        extra["dual_path/target_cosine"] = stats.target_cosine
    return extra


# ----------------------------------------------------------------------------------------- gradients


def align_partitions_(clean: list[torch.Tensor], augmented: list[torch.Tensor], group: Any,
                      tracker: ConflictTracker, device: torch.device) -> AlignStats | None:
    """``augmented <- coef_c clean + coef_a augmented`` in place, the coefficients from the GLOBAL
    products over ``group`` (the ranks whose partitions tile the gradient; None: these lists are the
    whole gradient). Collective: one all-reduce of three scalars.

    Returns None, touching nothing (no EMA move, no count), when the products are not finite: the
    caller then makes every rank skip the update."""
    stats = tracker.aligner.align_(clean, augmented, group, device)
    if stats is not None:
        tracker.record(stats)
    return stats


# ------------------------------------------------------------------------------------------ the mode


@functools.cache
def _warn_single_path_augment_ignored(algo: int) -> None:
    log.warning("dual_path: rawboost.enabled is ignored (the clean path stays clean; the augmented path uses "
                "RawBoost algo %d)", algo)


@register_step_mode("dual_path")
def dual_path_step(engine: "DeepSpeedEngine", micro_batches: list[Batch], ctx: StepContext,
                   augment: Augment | None = None) -> StepStats:
    """The ``dual_path`` step mode (``dual_path.enabled``); see the module doc. ``augment`` replaces the
    augmented path's RawBoost (tests; other augmentations). ``StepStats.loss`` is the clean loss."""
    if ctx.augment is not None:
        _warn_single_path_augment_ignored(ctx.cfg.dual_path.rawboost_algo)
    clean, augmented = dual_inputs(ctx, micro_batches, augment or path_augment(ctx))
    samples, seconds = global_counts(ctx, clean)
    scale = loss_scale(ctx, samples)
    tracker = ConflictTracker(ctx)

    loss_clean = forward_backward(engine, clean, scale, ctx)
    grads = owned_gradients(engine)
    saved = flat_copy(grads)
    discard_gradients(engine)
    loss_aug = forward_backward(engine, augmented, scale, ctx)
    stats = align_partitions_(saved, owned_gradients(engine), owned_parameters(engine).group, tracker, ctx.device)
    del saved

    # a non-finite augmented loss or gradient product makes every rank skip (0 x inf = NaN)
    loss = loss_clean + 0.0 * loss_aug + (0.0 if stats is not None else math.nan)
    return finish_step(engine, ctx, loss, samples, seconds, step_extras(stats, tracker),
                       {"dual_path/loss_aug": loss_aug})

