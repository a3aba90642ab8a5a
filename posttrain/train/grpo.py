"""GRPO fine-tuning as a step mode (``grpo.enabled``; objective in ``posttrain.train.grpo_loss``).

Each micro-batch: the policy (the engine, in train mode) gives logits; ``grpo.sample_num`` labels per
utterance are drawn from its softmax with a generator seeded by (``train.seed``, step, rank, micro-batch),
so a resumed run draws what an uninterrupted one draws with no generator state to save; the reference
model (and for ``grpo3`` the old policy) give logits under ``no_grad`` in eval mode; the loss is the mean
of ``-(pg - beta KL)`` over every (utterance, sample) pair of the global step.

The frozen models are sharded as the policy is (``FrozenModel``): under ZeRO-3 a DeepSpeed engine
without an optimiser over partitions of the same shapes (as TRL holds its reference model), so each costs
2 P / N bytes per GPU in bf16, not a full copy; under ZeRO-1/2 every rank holds the full policy anyway and
the copy is a stage-0 engine. The refresh ``old <- policy`` copies each rank's own partitions: no
communication. The reference is the run's initial model: on a fresh run a copy of the policy before the
first step, on a resume rebuilt from the run's start (``finetune.init_from``); the old policy is written
into every checkpoint (per rank under ZeRO-3) and read back.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from posttrain.data.batch import Batch
from posttrain.dist import process_rank, world_group
from posttrain.train.grpo_loss import advantages, grpo_terms, sample_labels
from posttrain.train.step import (StepContext, StepStats, backward, dummy_batch, finish_step, global_counts,
                                  loss_scale, prepare, register_step_mode)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

OLD_POLICY_DIR = "grpo_old_policy"  # in a checkpoint's tag folder
STATE_KEY = "grpo"  # in StepContext.state: refreshes, the step of the last refresh, how the copy was saved


class GrpoResumeError(RuntimeError):
    """A checkpoint's old policy cannot be restored into this run (another world size under ZeRO-3)."""


def frozen_engine_config(engine_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config of a model that only runs forward: the policy's precision and, under ZeRO-3,
    its partitioning; stage 0 otherwise (ZeRO-1/2 shard optimiser state, which a frozen model has none of)."""
    config = copy.deepcopy(engine_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        config["zero_optimization"] = {"stage": 0}
    return config


class FrozenModel:
    """A no-gradient model in eval mode, sharded as the policy engine's model (see the module doc)."""

    def __init__(self, model: torch.nn.Module, engine_config: dict[str, Any]):
        import deepspeed

        model.requires_grad_(False)
        config = frozen_engine_config(engine_config)
        self.partitioned = config["zero_optimization"]["stage"] == 3
        self.engine, *_ = deepspeed.initialize(model=model, config=config)
        self.engine.eval()
        if getattr(model, "pool_over_padding", False):
            # AD runs its reference and old policy on the policy's batch as the policy sees it: padding
            # unmasked into the pool is the detector's training-batch rule (its own flag); the encoder
            # stays in eval mode (no dropout), as AD's frozen models
            model.training = True

    @torch.no_grad()
    def logits(self, batch: Batch) -> torch.Tensor:
        return self.engine(batch.waveforms, batch.lengths).float()

    def _local(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """This rank's share of ``module``'s weights: its ZeRO-3 partitions, else the full tensors."""
        tensors = {f"param.{name}": param.ds_tensor if self.partitioned else param
                   for name, param in module.named_parameters()}
        tensors.update({f"buffer.{name}": buffer for name, buffer in module.named_buffers()})
        return tensors

    @torch.no_grad()
    def copy_from(self, policy: "DeepSpeedEngine") -> None:
        """Take the policy's current (low-precision) weights, rank by rank from its own share."""
        mine, theirs = self._local(self.engine.module), self._local(policy.module)
        for name, tensor in mine.items():
            source = theirs[name]
            if source.shape != tensor.shape or source.dtype != tensor.dtype:
                raise RuntimeError(f"{name}: the policy's share is {tuple(source.shape)} {source.dtype}, the frozen "
                                   f"model's {tuple(tensor.shape)} {tensor.dtype} (not partitioned alike)")
            tensor.data.copy_(source.data)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self._local(self.engine.module).items()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        mine = self._local(self.engine.module)
        if set(mine) != set(tensors):
            raise GrpoResumeError(f"{where}: holds other tensors than this model "
                                  f"({len(set(mine) ^ set(tensors))} differ): not this run's old policy")
        for name, tensor in mine.items():
            if tensors[name].shape != tensor.shape:
                raise GrpoResumeError(f"{where}: {name} is {tuple(tensors[name].shape)}, this run's share "
                                      f"{tuple(tensor.shape)}")
            tensor.data.copy_(tensors[name].to(tensor.device, tensor.dtype))


@dataclass
class GrpoModels:
    """GRPO's frozen models, kept in ``StepContext.companions``; ``save`` writes the old policy."""

    reference: FrozenModel
    old: FrozenModel | None  # grpo3 only

    def save(self, tag_dir: Path) -> None:
        """Collective (per rank under ZeRO-3, else rank 0): the old policy into ``tag_dir``."""
        if self.old is None or (not self.old.partitioned and process_rank() != 0):
            return
        from safetensors.torch import save_file

        path = old_policy_path(tag_dir, self.old.partitioned)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        save_file(self.old.state(), str(partial))
        os.replace(partial, path)


def old_policy_path(tag_dir: Path, partitioned: bool) -> Path:
    name = f"rank{process_rank():05d}.safetensors" if partitioned else "model.safetensors"
    return Path(tag_dir) / OLD_POLICY_DIR / name


def set_up_grpo(engine: "DeepSpeedEngine", ctx: StepContext, resumed_from: Path | None) -> None:
    """The reference (and old policy): copies of the policy on a fresh run; on a resume the reference
    rebuilt from the run's start and the old policy read from the checkpoint."""
    grpo = ctx.cfg.grpo
    if ctx.build_model is None:
        raise RuntimeError("GRPO needs StepContext.build_model (the trainer's model copies)")
    if resumed_from is None:
        reference = FrozenModel(ctx.build_model(False), ctx.engine_config)
        reference.copy_from(engine)
    else:
        reference = FrozenModel(ctx.build_model(True), ctx.engine_config)
    old = None
    if grpo.variant == "grpo3":
        old = FrozenModel(ctx.build_model(False), ctx.engine_config)
        if resumed_from is None:
            old.copy_from(engine)
        else:
            _restore_old_policy(old, Path(resumed_from), ctx)
    ctx.state.setdefault(STATE_KEY, {"refreshes": 0, "old_policy_step": 0})
    ctx.state[STATE_KEY]["saved_world_size"] = ctx.world_size
    ctx.companions[STATE_KEY] = GrpoModels(reference=reference, old=old)


def _restore_old_policy(old: FrozenModel, tag_dir: Path, ctx: StepContext) -> None:
    from safetensors.torch import load_file

    saved = ctx.state.get(STATE_KEY, {}).get("saved_world_size")
    if old.partitioned and saved != ctx.world_size:
        raise GrpoResumeError(f"{tag_dir}: the GRPO old policy was saved in ZeRO-3 partitions of {saved} ranks; "
                              f"resume at world size {saved} (this run has {ctx.world_size})")
    path = old_policy_path(tag_dir, old.partitioned)
    if not path.is_file():
        raise GrpoResumeError(f"{path}: missing: the checkpoint holds no GRPO old policy (not a grpo3 run's)")
    old.load_state(load_file(str(path)), str(path))


def sampling_generator(seed: int, step: int, rank: int, micro_batch: int) -> torch.Generator:
    """The label sampler of one micro-batch: a function of where it is in the run, so a resume needs no
    saved generator state and ranks draw independently."""
    digest = hashlib.sha256(f"grpo-sampling:{seed}:{step}:{rank}:{micro_batch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _join_micro_batch(engine: "DeepSpeedEngine", models: GrpoModels, ctx: StepContext) -> torch.Tensor:
    """A rank with no samples in this micro-batch runs the others' collectives: the forward passes (ZeRO-3
    gathers) and the advantage statistics; its loss is 0 with the same hooks."""
    dummy = dummy_batch(ctx.sample_rate_hz, ctx.device)
    loss = engine(dummy.waveforms, dummy.lengths).float().sum() * 0.0
    for frozen in (models.reference, models.old):
        if frozen is not None:
            frozen.logits(dummy)
    if ctx.cfg.grpo.normalise == "batch":
        advantages(torch.zeros(0, ctx.cfg.grpo.sample_num, device=ctx.device), ctx.cfg.grpo.std_floor, "batch",
                   world_group())
    return loss


def _micro_batch(engine: "DeepSpeedEngine", models: GrpoModels, batch: Batch, ctx: StepContext,
                 index: int, scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss to back-propagate, this rank's sums over its utterances of the per-utterance means)."""
    grpo = ctx.cfg.grpo
    logits = engine(batch.waveforms, batch.lengths).float()
    ref_logits = models.reference.logits(batch)
    old_logits = models.old.logits(batch) if models.old is not None else None
    generator = sampling_generator(ctx.cfg.train.seed, ctx.step, process_rank(), index)
    sampled = sample_labels(logits, grpo.sample_num, generator)
    terms = grpo_terms(logits, ref_logits, old_logits, sampled, batch.labels, beta=grpo.beta, epsilon=grpo.epsilon,
                       std_floor=grpo.std_floor, normalise=grpo.normalise, group=world_group())
    per_utterance = terms.objective.mean(dim=1)  # every utterance has sample_num pairs: the pair mean
    with torch.no_grad():
        cross_entropy = torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")
    sums = {"grpo/reward": terms.reward.mean(dim=1).sum(), "grpo/kl": terms.kl.mean(dim=1).sum(),
            "grpo/clip_fraction": terms.clipped.float().mean(dim=1).sum(), "grpo/cross_entropy": cross_entropy}
    return -per_utterance.sum() * scale, {**sums, "loss": -per_utterance.detach().sum()}


@register_step_mode("grpo", setup=set_up_grpo)
def grpo_step(engine: "DeepSpeedEngine", micro_batches: list[Batch], ctx: StepContext) -> StepStats:
    """One GRPO update over the micro-batches; for grpo3 the old policy is refreshed after every
    ``grpo.inner_step_size``-th step (AntiDeepfake refreshes after the update of its 1000th, 2000th, ...
    batch)."""
    models: GrpoModels = ctx.companions[STATE_KEY]
    batches = prepare(ctx, micro_batches)
    samples, seconds = global_counts(ctx, batches)
    scale = loss_scale(ctx, samples)
    names = ("grpo/reward", "grpo/kl", "grpo/clip_fraction", "grpo/cross_entropy", "loss")
    totals = {name: torch.zeros((), dtype=torch.float64, device=ctx.device) for name in names}
    for index, batch in enumerate(batches):
        if batch.is_empty:
            loss = _join_micro_batch(engine, models, ctx)
        else:
            loss, sums = _micro_batch(engine, models, batch, ctx, index, scale)
            for name, value in sums.items():
                totals[name] += value.double()
        backward(engine, loss, is_last=index == len(batches) - 1)
    loss_sum = totals.pop("loss")
    stats = finish_step(engine, ctx, loss_sum, samples, seconds, sample_sums=totals)
    state = ctx.state[STATE_KEY]
    if models.old is not None and (ctx.step + 1) % ctx.cfg.grpo.inner_step_size == 0:
        models.old.copy_from(engine)
        state["refreshes"] += 1
        state["old_policy_step"] = ctx.step + 1
    stats.extra.update({"grpo/refreshes": float(state["refreshes"]),
                        "grpo/old_policy_step": float(state["old_policy_step"])})
    return stats
