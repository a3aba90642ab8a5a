"""Detectors built straight into ZeRO-3 partitions, and weights loaded into them one module at a time.

Without this every rank builds the whole fp32 model and DeepSpeed partitions it at ``initialize``: 4 P
bytes per rank at start-up. Under ``partitioned_build(ds_config)`` (``deepspeed.zero.Init``) each
module's parameters are partitioned as soon as its constructor returns, so a rank never holds more
than one module in full next to its own partitions; ``load_into_partitions`` then fills them from a
weights file without any rank holding a full state dict.

**The same weights as a plain build, bit for bit, for the same seed.** transformers' own ZeRO-3
construction (``_from_config`` / ``from_pretrained`` while an ``HfDeepSpeedConfig`` is alive) is not
used for the random initialisation: it skips torch's default initialisers and re-initialises on rank 0
only, which draws other numbers than a plain build, and on the wav2vec 2.0 family it fails outright
(transformers 5.23: its init pass gathers a module's own and its children's parameters, but the
positional conv's weight-norm originals sit one level further down). Here instead:

- the constructors run as in a plain build: ``zero.Init(tensor_overrides=[])`` leaves tensor creation
  alone, so torch's default initialisers draw from the CPU generator into full fp32 tensors, before
  DeepSpeed moves each module's parameters to the device, broadcasts rank 0's and partitions them;
- transformers' init pass (``post_init`` -> ``init_weights``) would run on empty partitions: it is
  deferred and replayed afterwards in its own order (``smart_apply``: children first) with each
  module's parameters gathered (``init_scope``) and on the host (``on_host``); every rank draws the
  same numbers, rank 0's are kept;
- the build is fp32 whatever the training precision and the partitions are cast last (``cast_partitions``):
  initialisers drawing into bf16 tensors draw other numbers (8 random bits per uniform draw), and a
  plain build is cast to bf16 by DeepSpeed after the same fp32 initialisation.

An ``HfDeepSpeedConfig`` is kept alive during the construction: wav2vec 2.0's positional conv applies
its weight norm under ``GatheredParameters`` only when transformers sees ZeRO-3 enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

# detector key -> a function reading that tensor (fp32, full shape) when called
TensorReaders = Mapping[str, Callable[[], torch.Tensor]]


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitions (built under ``partitioned_build``)."""
    return any(hasattr(param, "ds_id") for param in module.parameters())


@contextlib.contextmanager
def partitioned_build(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules constructed inside are partitioned as their constructors return (see the module doc);
    transformers' init pass is deferred to ``initialise_partitioned``."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    init_weights = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = _deferred_init_weights
    try:
        with transformers_sees(HfDeepSpeedConfig(ds_config)), \
                deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.float32, tensor_overrides=[]):
            yield
    finally:
        PreTrainedModel.init_weights = init_weights


@contextlib.contextmanager
def transformers_sees(hf_config: Any) -> Iterator[None]:
    """transformers' view of DeepSpeed for the block: ``hf_config`` (an ``HfDeepSpeedConfig``, held
    alive here: transformers keeps a weak reference), or None for no ZeRO-3. The previous view comes back
    afterwards (accelerate's DeepSpeed plugin holds one for its lifetime)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    previous = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter of the reference itself
    if hf_config is None:
        hf_deepspeed.unset_hf_deepspeed_config()
    else:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = previous


def _deferred_init_weights(model: PreTrainedModel) -> None:
    """``PreTrainedModel.init_weights`` inside ``partitioned_build``: replayed by ``initialise_partitioned``."""


def init_scope(module: nn.Module) -> list[nn.Parameter]:
    """The parameters transformers' ``_init_weights(module)`` may touch: the module's own, its direct
    children's (it initialises e.g. ``module.projection.weight`` from the parent), and the originals of a
    parametrised (weight-norm) weight on either, which torch keeps under ``parametrizations``."""
    params: list[nn.Parameter] = []
    for owner in (module, *module.children()):
        params += owner.parameters(recurse=False)
        if parametrize.is_parametrized(owner):
            params += owner.parametrizations.parameters()
    return list(dict.fromkeys(params))


def initialise_partitioned(model: PreTrainedModel) -> None:
    """transformers' ``init_weights`` on a partitioned model: ``initialize_weights``'s ``smart_apply``
    order, each module's ``init_scope`` gathered around its ``_initialize_weights``, then the tying.
    transformers must not see ZeRO-3 meanwhile: some ``_init_weights`` (HuBERT's) would gather again
    what is gathered already."""
    import deepspeed
    from transformers.initialization import guard_torch_init_functions

    custom_code = model.is_custom_code()

    def visit(module: nn.Module, initialise: Callable[[nn.Module, bool], None]) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialise)
        scope = init_scope(module)
        with deepspeed.zero.GatheredParameters(scope, modifier_rank=0), on_host(scope):
            initialise(module, custom_code)

    with torch.no_grad(), guard_torch_init_functions(), transformers_sees(None):
        visit(model, model._initialize_weights)
    model.tie_weights(recompute_mapping=False)


@contextlib.contextmanager
def on_host(params: list[nn.Parameter]) -> Iterator[None]:
    """The (gathered) ``params`` on the host for the block, their device tensors updated afterwards: a
    plain build initialises on the host before DeepSpeed moves the model to the GPU, so initialisers must
    draw from the CPU generator here too. A no-op on the CPU."""
    on_device = {param: param.data for param in params if param.device.type != "cpu"}
    for param, data in on_device.items():
        param.data = data.cpu()
    try:
        yield
    finally:
        for param, data in on_device.items():
            data.copy_(param.data)
            param.data = data


def cast_partitions(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every partition (and the empty placeholder DeepSpeed reads a parameter's dtype from) to
    ``dtype``: what DeepSpeed's engine does to a plain model's parameters under bf16/fp16, and leaves
    to ``zero.Init`` for a partitioned one."""
    for param in module.parameters():
        if param.dtype != dtype:
            param.ds_tensor.data = param.ds_tensor.data.to(dtype)
            param.data = param.data.to(dtype)


def load_into_partitions(model: nn.Module, open_readers: Callable[[], TensorReaders], *, strict: bool = True) -> None:
    """Fill the parameters of the partitioned ``model`` from ``open_readers()`` (keys as
    ``model.state_dict()``), module by module as DeepSpeed's own recipe does: the module's parameters are
    gathered, rank 0 reads and copies its tensors, and every rank's partition is updated from rank 0's.

    Collective. Only rank 0 calls ``open_readers`` and reads a file; a source that fails to open or to
    read (a tensor of another shape), or (``strict``) whose keys differ from the model's
    (``load_state_dict(strict=True)``'s message), raises on every rank. Not ``strict``: the parameters the
    source has are loaded, the others left as they are."""
    import deepspeed
    import torch.distributed as torch_dist

    readers, error = None, None
    if torch_dist.get_rank() == 0:
        try:
            readers = open_readers()
            error = key_mismatch(model, readers.keys()) if strict else None
        except Exception as exception:  # re-raised on every rank below
            error = exception
    _raise_everywhere(error)
    box = [set(readers) if readers is not None else None]
    torch_dist.broadcast_object_list(box, src=0)
    keys = box[0]
    for prefix, module in model.named_modules():
        params = {key: param for key, param in module.named_parameters(prefix=prefix, recurse=False) if key in keys}
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            if readers is not None and error is None:
                try:
                    for key, param in params.items():
                        param.copy_(readers[key]())
                except Exception as exception:  # the other ranks are in the same gathers: raised after them
                    error = exception
    _raise_everywhere(error)


def _raise_everywhere(error: Exception | None) -> None:
    """Raise rank 0's ``error`` on every rank (collective), or nothing when it has none."""
    import torch.distributed as torch_dist

    box = [error]
    torch_dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def partition_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The parameter dtype of a DeepSpeed config: bf16 or fp16 mixed precision, else fp32."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    return torch.float16 if ds_config.get("fp16", {}).get("enabled") else torch.float32


def key_mismatch(model: nn.Module, keys: Any) -> RuntimeError | None:
    """The error ``model.load_state_dict(state, strict=True)`` raises for a state dict with ``keys``."""
    expected, given = list(model.state_dict()), list(keys)
    expected_set, given_set = set(expected), set(given)
    missing = [key for key in expected if key not in given_set]
    unexpected = [key for key in given if key not in expected_set]
    parts = [f"{kind} key(s) in state_dict: " + ", ".join(f'"{key}"' for key in found) + ". "
             for kind, found in (("Missing", missing), ("Unexpected", unexpected)) if found]
    if not parts:
        return None
    return RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}:\n\t" + "\n\t".join(parts))
