import pytest
import yaml

from posttrain.config import (ConfigError, PosttrainConfig, SamConfig, apply_overrides, dump_config, from_dict,
                              load_config, resolved, to_dict)


def test_defaults_are_the_antideepfake_hyperparameters():
    cfg = PosttrainConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps, cfg.optim.grad_clip_norm) == (1e-7, 0.01, 1e-6, 100.0)
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_end_steps, cfg.schedule.final_lr_ratio) == (80_000, 800_000, 0.01)
    assert (cfg.train.max_steps, cfg.train.max_epochs, cfg.train.seed) == (800_000, 30, 1234)
    assert (cfg.data.train.max_batch_seconds, cfg.data.train.num_buckets) == (100.0, 20)


@pytest.mark.parametrize("override, key", [
    ("train.zero_stage=4", "train.zero_stage"),
    ("optim.lr=-1", "optim.lr"),
    ("data.train.crop.max_seconds=1", "data.train.crop.max_seconds"),
    ("data.train.num_workers=two", "data.train.num_workers"),
    ("sam.variant=esam2", "sam.variant"),
    ("rawboost.algo=9", "rawboost.algo"),
    ("train.zero_stag=2", "train.zero_stag"),
    ("model.dropout=0.1", "model.dropout"),
])
def test_bad_values_raise_value_error_naming_the_key(override, key):
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    assert str(info.value).startswith(f"{key}:")


def test_yaml_then_overrides_then_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"zero_stage": 3, "precision": "fp32"}, "model": {"preset": "xlsr_1b"}}))
    cfg = load_config(path, ["train.zero_stage=2", "data.train.shards=[a, b]", "sam.enabled=true"])
    assert (cfg.train.zero_stage, cfg.train.precision, cfg.model.preset) == (2, "fp32", "xlsr_1b")
    assert cfg.data.train.shards == ["a", "b"] and cfg.sam.enabled
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_resolved_is_a_new_validated_copy():
    cfg = load_config(None, ["train.zero_stage=1"])
    later = resolved(cfg, {"train.zero_stage": 3, "model.preset": "xlsr_300m"})
    assert (later.train.zero_stage, later.model.preset) == (3, "xlsr_300m")
    assert (cfg.train.zero_stage, cfg.model.preset) == (1, "tiny")  # the validated config is unchanged
    with pytest.raises(ConfigError, match=r"^train.zero_stage: must be one of"):
        resolved(cfg, {"train.zero_stage": 4})
    with pytest.raises(ConfigError, match=r"^train.zero_stag: unknown key"):
        resolved(cfg, {"train.zero_stag": 2})


def test_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  betas: [0.9]\n")
    with pytest.raises(ConfigError, match=r"optim.betas: .*bad.yaml"):
        load_config(path)


def test_integers_are_accepted_for_floats_but_not_booleans():
    assert from_dict(SamConfig, {"rho": 1}).rho == 1.0
    with pytest.raises(ConfigError, match="rho"):
        from_dict(SamConfig, {"rho": True})


def test_paths_from_python_are_stored_as_text_and_other_objects_refused(tmp_path):
    cfg = load_config(None, [])
    rebuilt = from_dict(type(cfg.data), {"train": {"shards": [tmp_path / "a", str(tmp_path / "b")]}})
    assert rebuilt.train.shards == [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match=r"data\.train\.shards\[0\]|shards"):
        from_dict(type(cfg.data), {"train": {"shards": [3]}}, "data")


def test_sam_and_dual_path_together_are_refused():
    with pytest.raises(ConfigError, match="dual_path.enabled"):
        load_config(None, ["sam.enabled=true", "dual_path.enabled=true"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.max_steps"])
    assert to_dict(load_config(None, ["model.pretrained=null"]))["model"]["pretrained"] is None
