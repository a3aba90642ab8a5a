"""Every config file shipped under configs/ loads and validates (globbed: new files are checked too)."""

import json
from pathlib import Path

import pytest
import yaml

from posttrain.config import PosttrainConfig, load_config
from posttrain.models.presets import PRESETS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
TRAINING_PRESETS = ["wav2vec2_small", "wav2vec2_large", "mms_300m", "mms_1b", "xlsr_300m", "xlsr_1b", "xlsr_2b",
                    "hubert_xl"]


def validate_file(path: Path) -> None:
    kind = path.relative_to(CONFIGS).parts[0]
    if path.suffix == ".json":  # DeepSpeed templates
        assert isinstance(json.loads(path.read_text()), dict)
    elif kind == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        load_config_from_file(str(path))
    elif kind == "finetune":
        import posttrain.config as config

        load_config(path, cls=getattr(config, "FinetuneConfig", PosttrainConfig))
    else:
        assert isinstance(yaml.safe_load(path.read_text()), dict)
        load_config(path)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(CONFIGS)) for p in FILES])
def test_config_file_loads_and_validates(path):
    validate_file(path)


def test_every_training_preset_has_a_config_with_the_antideepfake_recipe():
    for name in TRAINING_PRESETS:
        cfg = load_config(CONFIGS / "posttrain" / f"{name}.yaml")
        assert cfg.model.preset == name and cfg.model.pretrained == PRESETS[name].hub_id
        assert cfg.optim.lr == (5e-6 if name == "hubert_xl" else 1e-7)
        assert (cfg.optim.weight_decay, cfg.optim.eps, cfg.optim.grad_clip_norm) == (0.01, 1e-6, 100.0)
        assert (cfg.schedule.warmup_steps, cfg.schedule.decay_end_steps, cfg.schedule.final_lr_ratio) == (80_000, 800_000, 0.01)
        assert (cfg.train.max_steps, cfg.train.max_epochs, cfg.train.seed) == (800_000, 30, 1234)
        assert cfg.data.train.max_batch_seconds == (50.0 if name == "xlsr_2b" else 100.0)
        assert cfg.model.gradient_checkpointing == (PRESETS[name].params_millions > 900)
        assert cfg.rawboost.enabled and cfg.rawboost.algo == 5
    demo = load_config(CONFIGS / "posttrain" / "demo.yaml")
    assert demo.model.preset == "tiny" and demo.data.train.shards == ["demo_data/shards/train"]
    assert demo.data.valid.shards == ["demo_data/shards/valid"]


@pytest.mark.parametrize("name", ["xlsr_300m", "xlsr_1b", "xlsr_2b"])
def test_sam_presets_are_the_recipe_with_sam_as_the_sam_for_sdd_paper_uses_it(name):
    """Huang et al. (Interspeech 2025): rho 0.005 for an SSL encoder + linear head; everything else is
    the AntiDeepfake recipe of the base preset; bf16 and a ZeRO layout the SAM step accepts."""
    from posttrain.config import to_dict
    from posttrain.train.engine_config import deepspeed_config

    cfg = load_config(CONFIGS / "posttrain" / f"{name}_sam.yaml")
    assert cfg.sam.enabled and cfg.sam.rho == 0.005 and not cfg.sam.adaptive and cfg.sam.variant == "sam"
    assert cfg.train.precision == "bf16"
    ours, base = to_dict(cfg), to_dict(load_config(CONFIGS / "posttrain" / f"{name}.yaml"))
    assert ours.pop("sam") != base.pop("sam")
    assert ours.pop("output_dir") == base.pop("output_dir") + "_sam"
    assert ours["tracking"].pop("experiment") == base["tracking"].pop("experiment") + "_sam"
    assert ours == base
    deepspeed_config(cfg)  # refuses a ZeRO layout a SAM step cannot perturb
