"""The parameter and reduced-gradient elements *this rank owns* in a DeepSpeed engine (ZeRO 0-3).

Algorithms that need global scalars of the whole gradient (SAM's norm, gradient alignment's dot
products) or that edit weights in place work on these partitions: each rank computes partial sums
over its own elements and ONE all-reduce over ``OwnedParameters.group`` gives the global value,
with no element counted twice and no full gradient ever materialised.

Every list below holds flat 1-D views, one per trainable parameter this rank owns a piece of, all
in the same order (``names[i]`` is the module's parameter name, used e.g. by ASAM's weight rule):

============  ======================================  =============================  ========================
stage         ``model`` (what the forward computes     ``master`` (fp32 the optimiser  gradients (after the
              with; perturb these)                     updates)                        boundary backward)
============  ======================================  =============================  ========================
0 (fp32)      the whole ``param.data``                 the same tensor                 ``param.grad`` (already
                                                                                       all-reduced; replicated)
1, 2          ``param._hp_mapping.lp_fragment``: this  ``_hp_mapping.hp_fragment``:    the fragment of
              rank's slice of the flat bit16/fp32      the slice of                    ``averaged_gradients``
              buffer the model's params view           ``single_partition_of_fp32_     (``get_lp_grad_fragment``)
              (the rest of each param is a full        groups``; a separate copy
              replica, refreshed by                    in fp32 *and* bf16
              ``sync_model_copies``)
3             ``param.ds_tensor`` (the partition the   the slice of                    ``averaged_gradients``:
              next forward all-gathers from)           ``fp32_partitioned_groups_      views of the optimiser's
                                                       flat``; in fp32 it IS           flat grad partition buffer
                                                       ``ds_tensor`` (aliased)
============  ======================================  =============================  ========================

ZeRO-1/2/3 pad their partitions; padding elements have zero gradient (and are not listed for 1/2),
so sums are exact. Stage 0 in bf16 (DeepSpeed's ``BF16_Optimizer``) raises ``NotImplementedError``.

ZeRO settings that move parameters away from these partitions (``unsupported_zero_settings``) are
refused with a ``ConfigError`` naming the ``zero_optimization`` key, both when the DeepSpeed config is
built (``check_zero_section``) and whenever an engine's partitions are asked for: under them an
in-place edit silently never reaches the forward or the update (hpZ turns SAM into plain training).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from posttrain.config import ConfigError
from posttrain.errors import UserError


@dataclass
class OwnedParameters:
    """This rank's share of the trainable parameters (see the module doc for what each stage exposes).

    ``group`` is the process group whose ranks' shares tile the model exactly once; ``None`` means
    every rank holds everything (stage 0), so local sums already are global."""

    stage: int
    names: list[str]
    model: list[torch.Tensor]
    master: list[torch.Tensor]
    group: Any
    # offsets[i]: where model[i] starts inside its parameter's flattened elements (None: all 0, whole
    # parameters), so a per-element rule (ESAM's weight mask) is the same however the model is sharded
    offsets: list[int] | None = None

    def offset(self, index: int) -> int:
        return 0 if self.offsets is None else self.offsets[index]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.model)

    @property
    def master_aliases_model(self) -> bool:
        """True when editing ``model`` also edits the optimiser's master weights (ZeRO-3 fp32, stage 0):
        an in-place perturbation must then be undone from a saved copy, not from the master."""
        return any(m.data_ptr() == p.data_ptr() for m, p in zip(self.master, self.model))


# the DeepSpeed releases whose private ZeRO internals (``_hp_mapping``, ``averaged_gradients``,
# ``fp32_partitioned_groups_flat``, ...) this module was checked against; pyproject.toml pins the same range
TESTED_DEEPSPEED = ((0, 19), (0, 20))  # [from, before) as (major, minor)


def check_deepspeed_version(version: str) -> None:
    """Refuse a DeepSpeed outside ``TESTED_DEEPSPEED``: its internals may have moved, and a wrong view
    of the partitions would silently give a wrong SAM norm or alignment."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    (low, high) = TESTED_DEEPSPEED
    if not low <= major_minor < high:
        tested = f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"
        raise UserError(f"partitions: DeepSpeed {version} is untested: SAM and gradient alignment read private "
                        f"ZeRO internals checked on deepspeed{tested} only; install it with "
                        f"pip install 'deepspeed{tested}'")


def zero_stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def _offloaded(offload: Any) -> bool:
    return offload is not None and str(getattr(offload.device, "value", offload.device)) != "none"


def unsupported_zero_settings(zero: Any, stage: int) -> list[tuple[str, str]]:
    """``(zero_optimization key, why)`` for each setting of ``zero`` (DeepSpeed's ``DeepSpeedZeroConfig``)
    under which the owned partitions are not what the forward reads and the update applies."""
    problems = []
    if stage >= 1 and _offloaded(zero.offload_optimizer):
        problems.append(("offload_optimizer", "the master weights and gradient partitions live on the host"))
    if stage != 3:
        return problems
    if _offloaded(zero.offload_param):
        problems.append(("offload_param", "the parameter partitions live on the host or NVMe"))
    if zero.param_persistence_threshold > 0:
        problems.append(("stage3_param_persistence_threshold", "parameters under the threshold stay gathered, so "
                         "the forward never re-reads their partitions (set it to 0)"))
    if zero.zero_hpz_partition_size > 1:
        problems.append(("zero_hpz_partition_size", "hpZ: the forward gathers a secondary copy that only step() "
                         "refreshes, so a perturbation never reaches the second pass (set it to 1)"))
    if zero.zero_quantized_weights:
        problems.append(("zero_quantized_weights", "qwZ: the forward gathers quantised copies of the partitions"))
    if zero.zero_quantized_gradients:
        problems.append(("zero_quantized_gradients", "qgZ: the gradient partitions are reduced through a "
                         "quantised all-to-all, not the buffers read here"))
    if getattr(zero, "mics_shard_size", -1) > 0:  # DeepSpeed < 0.19
        problems.append(("mics_shard_size", "MiCS shards parameters over sub-groups, not over the data-parallel group"))
    return problems


def _refuse(problems: list[tuple[str, str]], why_here: str) -> None:
    if problems:
        key, why = problems[0]
        raise ConfigError(f"zero_optimization.{key}", f"{why}; {why_here}")


def check_zero_section(zero_section: dict[str, Any], step_mode: str, source: str) -> None:
    """Refuse (``ConfigError`` naming the key) a DeepSpeed ``zero_optimization`` section that a step
    mode editing owned partitions cannot run under; ``source`` says where the config came from."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        zero = DeepSpeedZeroConfig(**zero_section)
    except Exception:  # noqa: BLE001 - an invalid section: deepspeed.initialize reports it in its own words
        return
    _refuse(unsupported_zero_settings(zero, int(zero.stage)),
            f"step mode {step_mode!r} edits this rank's partitions in place and would silently train without "
            f"its effect (set in {source})")


def _check_supported(engine: Any) -> int:
    import deepspeed

    check_deepspeed_version(deepspeed.__version__)
    stage = zero_stage(engine)
    if stage == 0 and engine.bfloat16_enabled():
        raise NotImplementedError("partitions: ZeRO stage 0 with bf16 (DeepSpeed's BF16_Optimizer) is not "
                                  "supported; use zero_optimization.stage >= 1 for bf16")
    _refuse(unsupported_zero_settings(engine._config.zero_config, stage),
            "in-place edits of this rank's partitions (SAM, LookSAM, ESAM, dual path) would be lost")
    return stage


def _names(engine: Any) -> dict[int, str]:
    return {id(param): name for name, param in engine.module.named_parameters()}


def owned_parameters(engine: Any) -> OwnedParameters:
    """This rank's owned parameter views. Cheap (a walk over the parameters): build it per step, as
    checkpoint loading may re-point DeepSpeed's buffers."""
    stage = _check_supported(engine)
    names = _names(engine)
    optimizer = engine.optimizer
    if stage == 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        views = [p.detach().view(-1) for p in params]
        return OwnedParameters(0, [names.get(id(p), "") for p in params], views, views, None)
    if stage in (1, 2):
        params = [p for group in optimizer.bit16_groups for p in group if p._hp_mapping is not None]
        return OwnedParameters(stage, [names.get(id(p), "") for p in params],
                               [p._hp_mapping.lp_fragment.detach().view(-1) for p in params],
                               [p._hp_mapping.hp_fragment.detach().view(-1) for p in params], _dp_group_1_2(optimizer),
                               [p._hp_mapping.lp_fragment_address.start for p in params])
    params, masters = [], []
    for group, flat_master in zip(optimizer.fp16_groups, optimizer.fp32_partitioned_groups_flat):
        offset = 0
        for param in group:
            size = param.partition_numel()
            if param.requires_grad:
                params.append(param)
                masters.append(flat_master.detach().narrow(0, offset, size))
            offset += size
    persistent = [names.get(id(p), "?") for p in params if getattr(p, "ds_persist", False)]
    if persistent:
        raise ValueError(f"partitions: ZeRO-3 keeps {len(persistent)} parameters persistent (e.g. {persistent[0]}); "
                         "set zero_optimization.stage3_param_persistence_threshold to 0 so the forward reads "
                         "every parameter from its partition")
    # partition r of a parameter holds its flat elements [r * ds_numel, (r + 1) * ds_numel) (the last padded)
    partition = torch_dist.get_rank(group=optimizer.dp_process_group) if torch_dist.is_initialized() else 0
    return OwnedParameters(3, [names.get(id(p), "") for p in params], [p.ds_tensor.detach().view(-1) for p in params],
                           masters, optimizer.dp_process_group, [partition * p.ds_tensor.ds_numel for p in params])


def _dp_group_1_2(optimizer: Any) -> Any:
    groups = optimizer.real_dp_process_group
    if any(group is not groups[0] for group in groups):
        raise NotImplementedError("partitions: parameter groups with different data-parallel groups (MoE) "
                                  "are not supported")
    return groups[0]


def owned_gradients(engine: Any) -> list[torch.Tensor]:
    """The reduced gradient over this rank's owned elements, aligned with ``owned_parameters(engine)``.

    Valid between the accumulation-boundary ``engine.backward`` and ``engine.step()``; these are
    DeepSpeed's own buffers: editing them in place changes what ``step()`` applies."""
    stage = _check_supported(engine)
    optimizer = engine.optimizer
    if stage == 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise RuntimeError("partitions: no gradient yet (call engine.backward at the accumulation boundary first)")
        return [p.grad.detach().view(-1) for p in params]
    if stage in (1, 2):
        grads = []
        for group in optimizer.bit16_groups:
            for param in group:
                if param._hp_mapping is None:
                    continue
                try:
                    fragment = param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)
                except ValueError as error:
                    raise RuntimeError(f"partitions: {error}") from None
                grads.append(fragment.detach().reshape(-1))
        return grads
    averaged = optimizer.averaged_gradients  # {sub-group index: [grad partition per param]}
    if any(averaged.get(i) is None for i in range(len(optimizer.fp16_groups))):
        raise RuntimeError("partitions: no gradient yet (call engine.backward at the accumulation boundary first)")
    return [grad.detach().view(-1) for i, group in enumerate(optimizer.fp16_groups)
            for param, grad in zip(group, averaged[i]) if param.requires_grad]


def discard_gradients(engine: Any) -> None:
    """Drop the step's gradient so the next boundary backward starts from zero (a second pass of
    the same step: SAM, dual path). ``engine.optimizer.zero_grad()`` is enough on every supported
    DeepSpeed (0.16-0.19.8, read in their sources and measured on 0.19.8): ZeRO-1/2 set ``param.grad``
    and ``param.grad_accum`` (the fp32 accumulation of bf16 gradients) to None, so the next reduction
    overwrites ``averaged_gradients`` / the partition buffer instead of adding to it; ZeRO-3 resets
    ``micro_step_id`` to 0, so its reduce copies into the gradient partitions ("don't accumulate").
    No explicit zeroing of the buffers is needed."""
    engine.optimizer.zero_grad()


def sync_model_copies(engine: Any) -> None:
    """After in-place edits of ``owned_parameters(engine).model``, make the tensors the forward reads
    see them. ZeRO-1/2 keep a full model replica on every rank: all-gather the owned slices (the
    same collective ``step()`` ends with). ZeRO-3 reads the partitions at the next forward and
    stage 0 owns everything: nothing to do. Collective under ZeRO-1/2."""
    if zero_stage(engine) not in (1, 2):
        return
    from deepspeed.runtime.utils import all_gather_dp_groups

    optimizer = engine.optimizer
    all_gather_dp_groups(groups_flat=optimizer.bit16_groups_flat,
                         partitioned_param_groups=optimizer.parallel_partitioned_bit16_groups,
                         dp_process_group=optimizer.real_dp_process_group,
                         start_alignment_factor=optimizer.nccl_start_alignment_factor,
                         allgather_bucket_size=optimizer.allgather_bucket_size)


def check_partitions_released(engine: Any) -> None:
    """ZeRO-3: every owned parameter must be released (not gathered), or an edit of its partition
    would not reach the next forward. A no-op for the other stages."""
    if zero_stage(engine) != 3:
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    names = _names(engine)
    gathered = [names.get(id(p), "?") for group in engine.optimizer.fp16_groups for p in group
                if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    if gathered:
        raise RuntimeError(f"partitions: {len(gathered)} ZeRO-3 parameters are still gathered after backward "
                           f"(e.g. {gathered[0]}); editing their partitions would not reach the next forward")


# ------------------------------------------------------------------------------- local partial sums


def flat_copy(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None,
              into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``tensors`` copied into views of ONE contiguous buffer (of ``dtype``, default theirs): ``into``
    when it has their sizes (reused across steps), else a new buffer."""
    sizes = [t.numel() for t in tensors]
    if into is None or [t.numel() for t in into] != sizes:
        if not tensors:
            return []
        flat = torch.empty(sum(sizes), dtype=dtype or tensors[0].dtype, device=tensors[0].device)
        into = list(flat.split(sizes))
    torch._foreach_copy_(into, list(tensors))
    return into


def accumulation_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, fp64 when any is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def local_sum_of_squares(tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """``sum_i ||t_i||^2`` (float64 scalar) over local tensors; at least fp32 accumulation per tensor."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(list(tensors), 2, dtype=accumulation_dtype(tensors))
    return torch.stack(norms).double().square().sum()


def local_dot(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor],
              device: torch.device | None = None) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` (float64 scalar) over local tensor pairs of equal sizes."""
    if not first:
        return torch.zeros((), dtype=torch.float64, device=device)
    dtype = accumulation_dtype([*first, *second])
    dots = [torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)) for a, b in zip(first, second)]
    return torch.stack(dots).double().sum()
