"""One optimiser step over ``grad_accum_steps`` micro-batches, in a mode chosen by the config.

A *step mode* is a function ``(engine, micro_batches, ctx) -> StepStats`` registered under a name;
the training loop calls ``get_step_mode(step_mode_name(cfg))`` and never knows which one ran.
"plain" lives here; "sam" and "dual_path" register themselves from their own modules (listed in
``STEP_MODE_MODULES``, imported on first use). Every mode is built from the same blocks:

1. ``prepare(ctx, micro_batches)``: to the device, RawBoost drawn once per micro-batch (reuse the
   result for every pass of the step: SAM's two passes must see the same waveforms);
2. ``global_counts(ctx, batches)``: the step's global samples and audio seconds, which fix the loss
   scale so the gradient is the mean over every sample of the global step, however dynamic batching
   spread them over ranks and micro-batches. The loader's per-batch join collective already carries
   them (``Batch.global_counts``); only batches from elsewhere cost an all_reduce here. With step 4's
   collective that makes ONE collective per micro-batch before the forward and ONE after the
   backward, the only host synchronisations of a step;
3. ``micro_loss(engine, batch, scale)`` then ``backward(engine, loss, is_last)``, per micro-batch
   (a join batch, ``B == 0``, runs a tiny dummy input with loss x 0 so ZeRO's hooks and collectives
   stay in lockstep across ranks);
4. ``finish_step(engine, ctx, ...)``: one all_reduce of (loss sum, non-finite count, the stop
   signal flag, the mode's own sums) so every rank
   takes the same decision; a non-finite step leaves weights, optimiser state and schedule
   untouched, while ``engine.step()`` still runs so DeepSpeed's counters and gradient buffers
   advance and clear as on any boundary.

Non-finite *gradients* with a finite loss are caught by DeepSpeed itself: ZeRO 1-3 skip the update
when the (globally reduced) gradient norm is not finite, which ``engine.was_step_applied()`` reports.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from posttrain.config import (FinetuneConfig, PosttrainConfig, StepModeDecl, enabled_step_modes,
                              step_mode_declarations)
from posttrain.data.batch import TRANSFORMERS_INPUT_EPS, Batch, normalize_waveforms
from posttrain.dist import all_reduce_sum, global_sums, world_group
from posttrain.train.stop import StopRequest

if TYPE_CHECKING:  # deepspeed picks its accelerator at import: the engine module imports it first
    from deepspeed import DeepSpeedEngine

# A join batch still runs this much (silent-ish) audio: long enough for every preset's conv stack.
DUMMY_SECONDS = 0.1


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next ``step()`` can be turned into a no-op: DeepSpeed's ZeRO optimisers call the
    base optimiser's ``step`` on the fp32 partitions, so skipping it here keeps master weights and
    Adam moments unchanged while DeepSpeed's own bookkeeping runs as usual."""

    skip_next: bool = False

    def step(self, closure=None):
        if self.skip_next:
            return None
        return super().step(closure)


@dataclass
class StepStats:
    loss: float  # mean cross-entropy over the step's global samples (NaN/inf when non-finite)
    grad_norm: float  # global gradient norm before clipping (inf when DeepSpeed found it non-finite)
    lr: float  # the learning rate this step used
    samples: int  # global, join batches excluded
    audio_seconds: float  # global, padding excluded
    skipped: bool
    extra: dict[str, float] = field(default_factory=dict)  # mode-specific metrics, logged as-is
    stop_requested: bool = False  # a rank got the stop signal: every rank checkpoints and stops now


@dataclass
class StepContext:
    """What a step mode may use. ``state`` holds mode state that must survive a resume (e.g. an EMA):
    keep it JSON-serialisable, it is saved in every checkpoint's ``posttrain.json``."""

    cfg: PosttrainConfig
    optimizer: SkippableAdamW
    scheduler: LambdaLR
    device: torch.device
    world_size: int
    epoch: int = 0
    step: int = 0  # optimiser steps done before this one
    augment: Callable[[Batch, int], Batch] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    input_eps: float = TRANSFORMERS_INPUT_EPS  # the model's input normalisation (Detector.input_eps)
    # mode buffers that live for the run but are not checkpointed (device tensors, e.g. LookSAM's stored
    # direction): a resumed run starts them afresh
    scratch: dict[str, Any] = field(default_factory=dict)
    stop: StopRequest | None = None  # the scheduler's warning, agreed in finish_step's all_reduce
    # a copy of the trained model for a mode's frozen models (GRPO's reference and old policy), sharded
    # as the engine's: ``build_model(True)`` holds the run's initial weights, ``build_model(False)`` only
    # the architecture (its weights to be filled in); ``engine_config`` is the engine's DeepSpeed config
    build_model: Callable[[bool], torch.nn.Module] | None = None
    engine_config: dict[str, Any] = field(default_factory=dict)
    # what a mode keeps beside the engine (``register_step_mode(..., setup=)``), each with
    # ``save(tag_dir)``: collective, called in every checkpoint before it is marked complete
    companions: dict[str, Any] = field(default_factory=dict)

    @property
    def sample_rate_hz(self) -> int:
        return self.cfg.data.train.sample_rate_hz


StepFn = Callable[["DeepSpeedEngine", list[Batch], StepContext], StepStats]
# (engine, ctx, resumed tag folder or None) -> None: builds what the mode keeps beside the engine into
# ``ctx.companions`` (collective), restoring it from the tag folder on a resume
SetupFn = Callable[["DeepSpeedEngine", StepContext, Any], None]

_STEP_MODES: dict[str, StepFn] = {}
_SETUPS: dict[str, SetupFn] = {}


def register_step_mode(name: str, *, setup: SetupFn | None = None) -> Callable[[StepFn], StepFn]:
    """Decorator: ``@register_step_mode("sam") def sam_step(engine, micro_batches, ctx): ...``.
    ``setup``: run once by the trainer after the engine is built (and restored), before the first step.

    A mode other than ``plain`` is turned on by a config section that declares it (``STEP_MODE``, a
    ``posttrain.config.StepModeDecl``: its module, whether it edits ZeRO partitions, reads gradients
    during a backward or breaks LayerDrop, and what it conflicts with): the config's guards, the
    trainer's ZeRO checks and the module import on first use all come from that declaration. A mode
    chosen only by ``train.step_mode`` (no section) declares nothing: it edits no partition."""

    def register(fn: StepFn) -> StepFn:
        if name in _STEP_MODES and _STEP_MODES[name] is not fn:
            raise ValueError(f"step mode {name!r} is already registered ({_STEP_MODES[name].__qualname__})")
        _STEP_MODES[name] = fn
        if setup is not None:
            _SETUPS[name] = setup
        return fn

    return register


def declaration(cfg: PosttrainConfig | None, name: str) -> StepModeDecl | None:
    """What a schema declares about step mode ``name`` (None: nothing, e.g. ``plain``): ``cfg``'s own, or
    without one any schema's (post-training's, fine-tuning's)."""
    for schema in ([cfg] if cfg is not None else [PosttrainConfig, FinetuneConfig]):
        found = step_mode_declarations(schema).get(name)
        if found is not None:
            return found
    return None


def edits_partitions(cfg: PosttrainConfig, name: str) -> bool:
    decl = declaration(cfg, name)
    return decl is not None and decl.edits_partitions


def overlap_comm_safe(cfg: PosttrainConfig, name: str) -> bool:
    """Whether step mode ``name`` may run with ``zero_optimization.overlap_comm``: a mode that reads or edits
    gradients while a backward is still running (from autograd hooks) may not, as the reduction may then
    still be in flight on DeepSpeed's side stream. Reading the reduced partitions once ``engine.backward``
    has returned at the accumulation boundary is safe (ZeRO-1/2/3 synchronise the reduction there)."""
    decl = declaration(cfg, name)
    return decl is None or decl.overlap_comm_safe


def step_mode_name(cfg: PosttrainConfig) -> str:
    """``train.step_mode`` when set explicitly, else the mode the enabled section declares, else plain."""
    if cfg.train.step_mode != "auto":
        return cfg.train.step_mode
    enabled = enabled_step_modes(cfg)
    return enabled[0][1].name if enabled else "plain"


def get_step_mode(name: str, cfg: PosttrainConfig | None = None) -> StepFn:
    """The registered function of mode ``name``, importing the module ``cfg``'s schema declares for it."""
    decl = declaration(cfg, name)
    if name not in _STEP_MODES and decl is not None:
        importlib.import_module(decl.module)
    if name not in _STEP_MODES:
        raise ValueError(f"unknown step mode {name!r} (registered: {sorted(_STEP_MODES)})")
    return _STEP_MODES[name]


def set_up_step_mode(name: str, engine: "DeepSpeedEngine", ctx: StepContext, resumed_from: Any) -> None:
    """The mode's ``setup`` (collective), if it registered one; ``get_step_mode`` has imported it."""
    setup = _SETUPS.get(name)
    if setup is not None:
        setup(engine, ctx, resumed_from)


# ------------------------------------------------------------------------------------------ blocks


def make_augment(cfg: PosttrainConfig) -> Callable[[Batch, int], Batch] | None:
    """The on-device augmentation hook (RawBoost when ``cfg.rawboost.enabled``), or None."""
    if not cfg.rawboost.enabled:
        return None
    from posttrain.augment.rawboost import RawBoost

    return RawBoost(cfg.rawboost)


def model_inputs(batch: Batch, eps: float) -> Batch:
    """Per-utterance normalisation with the model's ``eps`` (``Detector.input_eps``), the last input
    step. The loader hands over raw audio because RawBoost's non-linear and clipping terms assume
    waveforms in [-1, 1] (reference pipeline: crop -> RawBoost -> normalise)."""
    if not batch.is_empty:
        batch.waveforms = normalize_waveforms(batch.waveforms, batch.lengths, eps)
    return batch


def prepare(ctx: StepContext, micro_batches: list[Batch]) -> list[Batch]:
    """Micro-batches on the device (pinned, non-blocking copies on CUDA), augmented once (draws depend
    on the read: sample id, epoch and repeat), then normalised."""
    pin = ctx.device.type == "cuda"  # page-locked, so the copy below is asynchronous
    batches = [(batch.pin_memory() if pin else batch).to(ctx.device, non_blocking=True) for batch in micro_batches]
    if ctx.augment is not None:
        batches = [ctx.augment(batch, ctx.epoch) for batch in batches]
    return [model_inputs(batch, ctx.input_eps) for batch in batches]


def global_counts(ctx: StepContext, batches: list[Batch]) -> tuple[int, float]:
    """(samples, audio seconds) of the whole step over all ranks: the sums the loader already agreed on
    (``Batch.global_counts``, no collective), else one all_reduce."""
    if all(batch.global_counts is not None for batch in batches):
        samples = sum(batch.global_counts[0] for batch in batches)
        audio_samples = sum(batch.global_counts[1] for batch in batches)
        return samples, audio_samples / ctx.sample_rate_hz
    local = [sum(len(batch) for batch in batches), sum(int(batch.lengths.sum()) for batch in batches)]
    samples, audio_samples = all_reduce_sum(local, ctx.device)
    return int(round(samples)), audio_samples / ctx.sample_rate_hz


def loss_scale(ctx: StepContext, global_samples: int) -> float:
    """Factor on a micro-batch's summed loss so that, after DeepSpeed divides by the accumulation
    steps and averages over ranks, the gradient is the mean over the step's global samples."""
    return ctx.world_size * ctx.cfg.train.grad_accum_steps / global_samples if global_samples else 0.0


def dummy_batch(sample_rate_hz: int, device: torch.device) -> Batch:
    """The stand-in input of a join batch: one short deterministic tone, label fake."""
    num_samples = int(DUMMY_SECONDS * sample_rate_hz)
    wave = 0.1 * torch.sin(torch.arange(num_samples, dtype=torch.float32, device=device) * 0.05)
    return Batch(wave[None, :], torch.tensor([num_samples], device=device),
                 torch.zeros(1, dtype=torch.long, device=device))


def micro_loss(engine: "DeepSpeedEngine", batch: Batch, scale: float,
               ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, detached per-sample loss ``[B]`` of the real samples): the head's own
    loss (``Detector.sample_losses``: cross-entropy, or the OC-softmax loss of ``model.head=oc_softmax``).

    A join batch forwards ``dummy_batch`` and returns its loss x 0 (zero gradient, same hooks and
    collectives) and no per-sample losses."""
    from posttrain.models.heads import sample_losses as head_losses

    if batch.is_empty:
        dummy = dummy_batch(ctx.sample_rate_hz, ctx.device)
        outputs = engine(dummy.waveforms, dummy.lengths)
        loss = head_losses(engine.module, outputs, dummy.labels).sum() * 0.0
        return loss, torch.zeros(0, device=ctx.device)
    outputs = engine(batch.waveforms, batch.lengths)
    losses = head_losses(engine.module, outputs, batch.labels)
    return losses.sum() * scale, losses.detach()


def backward(engine: "DeepSpeedEngine", loss: torch.Tensor, is_last: bool) -> None:
    """Back-propagate one micro-batch; the last one of the step is the accumulation boundary
    (gradients are reduced across ranks there). ``engine.step()`` is then called once per step."""
    engine.set_gradient_accumulation_boundary(is_last)
    engine.backward(loss)


def finish_step(engine: "DeepSpeedEngine", ctx: StepContext, loss_sum: torch.Tensor, samples: int,
                seconds: float, extra: dict[str, float] | None = None,
                sample_sums: dict[str, torch.Tensor] | None = None) -> StepStats:
    """Agree on finiteness and the step's loss in ONE all_reduce (built on the device: the step's only
    host synchronisation after the backward), then take (or skip) the update; see the module doc.
    ``sample_sums``: more per-rank sums (scalar tensors) reduced in the same collective and logged in
    ``extra`` as means over the step's global samples (e.g. SAM's loss increase)."""
    names = list(sample_sums or {})
    stop = loss_sum.new_tensor(float(ctx.stop is not None and ctx.stop.requested), dtype=torch.float64)
    local = torch.stack([loss_sum.detach().double().reshape(()), (~torch.isfinite(loss_sum)).double().reshape(()),
                         stop, *[sample_sums[name].detach().double().reshape(()).to(loss_sum.device) for name in names]])
    local = global_sums(local, world_group())
    total_loss, bad, stops, *sums = local.tolist()
    extra = dict(extra or {})
    extra.update({name: value / samples if samples else 0.0 for name, value in zip(names, sums)})
    nonfinite = bad > 0 or not math.isfinite(total_loss)
    lr = float(ctx.scheduler.get_last_lr()[0])
    ctx.optimizer.skip_next = nonfinite
    try:
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
    finally:
        ctx.optimizer.skip_next = False
    skipped = nonfinite or not engine.was_step_applied()
    if not skipped:
        ctx.scheduler.step()
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    return StepStats(loss=total_loss / samples if samples else 0.0, grad_norm=grad_norm, lr=lr,
                     samples=samples, audio_seconds=seconds, skipped=skipped, extra=extra, stop_requested=stops > 0)


# -------------------------------------------------------------------------------------------- plain


def sample_losses(engine: "DeepSpeedEngine", batches: list[Batch], scale: float,
                  ctx: StepContext) -> list[torch.Tensor]:
    """Forward + backward of every micro-batch, accumulation boundary at the last; returns each
    micro-batch's detached per-sample cross-entropy (ESAM selects samples by them)."""
    losses = []
    for index, batch in enumerate(batches):
        loss, ce = micro_loss(engine, batch, scale, ctx)
        backward(engine, loss, is_last=index == len(batches) - 1)
        losses.append(ce)
    return losses


def forward_backward(engine: "DeepSpeedEngine", batches: list[Batch], scale: float, ctx: StepContext) -> torch.Tensor:
    """``sample_losses`` summed: this rank's summed cross-entropy (float64). One pass of every step
    mode (SAM and dual path run two)."""
    return torch.cat(sample_losses(engine, batches, scale, ctx)).double().sum()


@register_step_mode("plain")
def plain_step(engine: "DeepSpeedEngine", micro_batches: list[Batch], ctx: StepContext) -> StepStats:
    """Cross-entropy, gradient accumulation over the micro-batches, one AdamW update."""
    batches = prepare(ctx, micro_batches)
    samples, seconds = global_counts(ctx, batches)
    loss_sum = forward_backward(engine, batches, loss_scale(ctx, samples), ctx)
    return finish_step(engine, ctx, loss_sum, samples, seconds)
