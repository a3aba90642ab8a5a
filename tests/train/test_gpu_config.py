"""The GPU-facing configuration: the resolved DeepSpeed config per step mode and device, fused AdamW,
the explicit attention kernel, and the optional compiled encoder."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import ClassVar

import pytest
import torch

from posttrain.config import ConfigError, ModelConfig, PosttrainConfig, Section, StepModeDecl, load_config
from posttrain.data.batch import Batch
from posttrain.models.backbones import get_backbone
from posttrain.models.detector import build_detector
from posttrain.models.presets import PRESETS, tiny_presets
from posttrain.train.trainer import build_optimizer
from posttrain.train.engine_config import deepspeed_config
from posttrain.train.step import _STEP_MODES, plain_step, register_step_mode

MODES = {"plain": [], "sam": ["sam.enabled=true"], "dual_path": ["dual_path.enabled=true"],
         "looksam": ["sam.enabled=true", "sam.variant=looksam"]}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resolved_deepspeed_config_per_mode_and_device(mode, stage):
    cfg = load_config(None, [*MODES[mode], f"train.zero_stage={stage}", "train.reduce_bucket_elements=12345",
                             "train.allgather_bucket_elements=678"])
    cuda = deepspeed_config(cfg, device_type="cuda")["zero_optimization"]
    cpu = deepspeed_config(cfg, device_type="cpu")["zero_optimization"]
    # every built-in mode reads gradients only after the boundary backward returned: overlap on CUDA
    assert cuda["overlap_comm"] is True and cpu["overlap_comm"] is False
    for zero in (cuda, cpu):
        assert zero["stage"] == stage and zero["contiguous_gradients"] is True and zero["reduce_bucket_size"] == 12345
        if stage == 3:
            assert zero["stage3_prefetch_bucket_size"] == 678 and zero["stage3_param_persistence_threshold"] == 0
            assert "allgather_bucket_size" not in zero
        else:
            assert zero["allgather_bucket_size"] == 678 and "stage3_prefetch_bucket_size" not in zero
    forced = load_config(None, [*MODES[mode], "train.overlap_comm=false"])
    assert deepspeed_config(forced, device_type="cuda")["zero_optimization"]["overlap_comm"] is False
    forced = load_config(None, [*MODES[mode], "train.overlap_comm=true"])
    assert deepspeed_config(forced, device_type="cpu")["zero_optimization"]["overlap_comm"] is True


@dataclasses.dataclass
class _HookedSection(Section):
    """A step mode that reads gradients from autograd hooks: a section declaring it is all it takes."""

    STEP_MODE: ClassVar[StepModeDecl] = StepModeDecl("test_reads_grads_in_hooks", __name__, overlap_comm_safe=False)
    enabled: bool = False


@dataclasses.dataclass
class _HookedSchema(PosttrainConfig):
    hooked: _HookedSection = dataclasses.field(default_factory=_HookedSection)


def test_a_mode_declared_unsafe_never_gets_overlap_comm():
    name = "test_reads_grads_in_hooks"
    register_step_mode(name)(plain_step)
    try:
        cfg = load_config(None, ["hooked.enabled=true"], cls=_HookedSchema)
        assert deepspeed_config(cfg, device_type="cuda")["zero_optimization"]["overlap_comm"] is False
        forced = load_config(None, ["hooked.enabled=true", "train.overlap_comm=true"], cls=_HookedSchema)
        with pytest.raises(ValueError, match=r"train\.overlap_comm: step mode 'test_reads_grads_in_hooks'"):
            deepspeed_config(forced, device_type="cuda")
        with pytest.raises(ConfigError, match=r"hooked.enabled: cannot be combined with sam.enabled"):
            load_config(None, ["hooked.enabled=true", "sam.enabled=true"], cls=_HookedSchema)
    finally:
        _STEP_MODES.pop(name)


def test_overrides_still_win_over_the_generated_zero_section():
    cfg = load_config(None, ["train.deepspeed_overrides={zero_optimization: {overlap_comm: false, reduce_bucket_size: 7}}"])
    zero = deepspeed_config(cfg, device_type="cuda")["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["reduce_bucket_size"] == 7


def test_bucket_sizes_are_validated_with_their_key():
    with pytest.raises(ValueError, match=r"train\.reduce_bucket_elements"):
        load_config(None, ["train.reduce_bucket_elements=0"])


def test_adamw_is_fused_on_cuda_only():
    cfg = load_config(None, [])
    model = build_detector(cfg.model)
    assert build_optimizer(model, cfg, torch.device("cuda")).defaults["fused"] is True
    assert not build_optimizer(model, cfg, torch.device("cpu")).defaults["fused"]
    assert not build_optimizer(model, cfg).defaults["fused"]


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    waves = torch.randn(2, 4000, generator=generator)
    waves[1, 2500:] = 0.0
    return Batch(waves, torch.tensor([4000, 2500]), torch.tensor([0, 1]))


def _logits(cfg: ModelConfig, batch: Batch) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    with torch.no_grad():
        return model(batch.waveforms, batch.lengths)


@pytest.mark.parametrize("preset", tiny_presets())
def test_auto_attention_is_the_familys_first_kernel_and_an_unsupported_one_names_the_key(preset):
    backbone = get_backbone(PRESETS[preset].architecture)
    assert build_detector(ModelConfig(preset=preset)).encoder.config._attn_implementation == backbone.attention_kernels[0]
    for kernel in ("sdpa", "eager"):
        if kernel in backbone.attention_kernels:
            assert build_detector(ModelConfig(preset=preset, attn_implementation=kernel)).encoder.config._attn_implementation == kernel
        else:
            with pytest.raises(ValueError, match=rf"model\.attn_implementation: '{kernel}' is not supported by the "
                                                 rf"{backbone.name} family"):
                build_detector(ModelConfig(preset=preset, attn_implementation=kernel))


def test_sdpa_equals_the_reference_maths():
    batch = _batch()
    torch.manual_seed(0)
    sdpa = _logits(ModelConfig(attn_implementation="sdpa"), batch)
    eager = _logits(ModelConfig(attn_implementation="eager"), batch)
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_flash_attention_without_its_package_names_the_key():
    with pytest.raises(ValueError, match=r"model\.attn_implementation: flash_attention_2 needs the flash-attn"):
        build_detector(ModelConfig(attn_implementation="flash_attention_2"))


def test_compile_flag_compiles_every_transformer_layer_and_keeps_the_state_dict_keys():
    plain = build_detector(ModelConfig())
    compiled = build_detector(ModelConfig(compile=True))
    assert all(layer._compiled_call_impl is not None for layer in compiled.encoder.encoder.layers)
    assert all(layer._compiled_call_impl is None for layer in plain.encoder.encoder.layers)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable


@pytest.mark.skipif(not __import__("os").environ.get("POSTTRAIN_TEST_COMPILE"),
                    reason="inductor compiles for ~4 min on 2 busy cores; set POSTTRAIN_TEST_COMPILE=1")
def test_compiled_encoder_trains_like_the_eager_one():
    torch.manual_seed(0)
    reference = build_detector(ModelConfig(gradient_checkpointing=True))
    torch.manual_seed(0)
    compiled = build_detector(ModelConfig(gradient_checkpointing=True, compile=True))
    batch = _batch()
    for width in (4000, 3200):  # two lengths: the dynamic-shape graph is reused
        lengths = batch.lengths.clamp(max=width)
        expected, actual = reference(batch.waveforms[:, :width], lengths), compiled(batch.waveforms[:, :width], lengths)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        expected.sum().backward()
        actual.sum().backward()
    for (name, a), (_, b) in zip(reference.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
