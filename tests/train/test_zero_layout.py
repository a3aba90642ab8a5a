"""ZeRO settings that move parameters away from the owned partitions are refused, with the key
named, for every step mode that edits partitions in place (SAM, LookSAM, ESAM, dual path), whether
they come through ``train.deepspeed_overrides`` or accelerate's DeepSpeed config. Under them an
in-place edit never reaches the forward (hpZ turns SAM into plain training without a word). The
engine-level guard on a real sharded engine is in tests/dist/test_sam_dist.py."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, FinetuneConfig, load_config
from posttrain.train.engine_config import deepspeed_config
from posttrain.finetuning import plugin_deepspeed_config

# zero_optimization entry -> the key the error must name
REFUSED = {
    "zero_hpz_partition_size": ({"zero_hpz_partition_size": 2}, 3),
    "zero_quantized_weights": ({"zero_quantized_weights": True}, 3),
    "zero_quantized_gradients": ({"zero_quantized_gradients": True}, 3),
    "offload_param": ({"offload_param": {"device": "cpu"}}, 3),
    "offload_optimizer": ({"offload_optimizer": {"device": "cpu"}}, 2),
    "stage3_param_persistence_threshold": ({"stage3_param_persistence_threshold": 100000}, 3),
}
MODES = {"sam": ["sam.enabled=true"], "looksam": ["sam.enabled=true", "sam.variant=looksam"],
         "esam": ["sam.enabled=true", "sam.variant=esam"], "dual_path": ["dual_path.enabled=true"]}


def _posttrain_cfg(mode_overrides, stage, zero, cls=None):
    cfg = load_config(None, [*mode_overrides, f"train.zero_stage={stage}"], **({"cls": cls} if cls else {}))
    cfg.train.deepspeed_overrides = {"zero_optimization": zero}
    return cfg


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key", REFUSED)
def test_refused_through_deepspeed_overrides(mode, key):
    zero, stage = REFUSED[key]
    with pytest.raises(ConfigError, match=rf"^zero_optimization\.{key}: .*step mode '(sam|dual_path)'.*"
                                          r"train\.deepspeed_overrides"):
        deepspeed_config(_posttrain_cfg(MODES[mode], stage, zero))


@pytest.mark.parametrize("mode", ["sam", "dual_path"])
@pytest.mark.parametrize("key", REFUSED)
def test_refused_through_accelerates_deepspeed_config(mode, key):
    zero, stage = REFUSED[key]
    cfg = load_config(None, ["finetune.init_from=x", *MODES[mode]], cls=FinetuneConfig)
    plugin = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": stage, **zero}}
    with pytest.raises(ConfigError, match=rf"^zero_optimization\.{key}: .*accelerate's DeepSpeed config"):
        plugin_deepspeed_config(plugin, cfg)


@pytest.mark.parametrize("key", REFUSED)
def test_plain_training_keeps_every_zero_option(key):
    zero, stage = REFUSED[key]
    config = deepspeed_config(_posttrain_cfg([], stage, zero))
    assert all(config["zero_optimization"][k] == v for k, v in zero.items())


def test_settings_without_effect_at_the_stage_and_the_defaults_pass():
    # ZeRO++ and parameter offload act at stage 3 only; stage 3's persistence is 0 by default here
    deepspeed_config(_posttrain_cfg(MODES["sam"], 2, {"zero_hpz_partition_size": 2, "offload_param": {"device": "cpu"}}))
    deepspeed_config(_posttrain_cfg(MODES["sam"], 3, {"offload_optimizer": {"device": "none"}}))
    cfg = load_config(None, ["finetune.init_from=x", "sam.enabled=true"], cls=FinetuneConfig)
    merged = plugin_deepspeed_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}},
                                     cfg)
    assert merged["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_mics_of_older_deepspeed_is_refused():
    """DeepSpeed < 0.19 still has MiCS (``mics_shard_size`` in its ZeRO config); 0.19 removed it and
    rejects the key itself. The rule reads the attribute when the installed version has it."""
    import types

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from posttrain.optim.partitions import unsupported_zero_settings

    zero = DeepSpeedZeroConfig(stage=3, stage3_param_persistence_threshold=0)
    assert unsupported_zero_settings(zero, 3) == []
    older = types.SimpleNamespace(**dict(zero), mics_shard_size=2)
    assert [key for key, _ in unsupported_zero_settings(older, 3)] == ["mics_shard_size"]
