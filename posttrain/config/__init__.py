"""Typed configuration: one dataclass per component, composed into ``PosttrainConfig`` (post-training)
and ``FinetuneConfig`` (fine-tuning).

Every section checks its types and validates itself when it is built, in code as from YAML; a bad value
raises ``ConfigError`` (a ``ValueError``) whose message starts with the dotted key, e.g.
``train.zero_stage: must be one of [1, 2, 3], got 4``. YAML presets live in ``configs/``; ``key=value``
overrides use dotted keys and YAML values. The homes: ``schema`` (the machinery), ``loading``, ``data``,
``training``, ``finetune`` (the sections); this package is their public face.
"""

from posttrain.config.data import CropConfig, DataConfig, StreamConfig
from posttrain.config.finetune import GRPO_VARIANTS, EvalSetConfig, FinetuneConfig, FinetuneSection, GrpoConfig
from posttrain.config.loading import load_config
from posttrain.config.schema import (SAMPLE_RATE_HZ, YAML11_EXPONENT, ConfigError, Conflict, Section, StepModeDecl,
                                     apply_overrides, blamed_override, dump_config, from_dict, load_yaml, require,
                                     require_choice, resolved, to_dict, unknown_key_hint)
from posttrain.config.training import (CheckpointConfig, DualPathConfig, ModelConfig, OptimConfig, PosttrainConfig,
                                       RawBoostConfig, SamConfig, ScheduleConfig, TrackingConfig, TrainConfig,
                                       enabled_step_modes, layerdrop_conflicts, step_mode_declarations,
                                       step_mode_sections)

__all__ = ["GRPO_VARIANTS", "SAMPLE_RATE_HZ", "YAML11_EXPONENT", "CheckpointConfig", "ConfigError", "Conflict", "CropConfig",
           "DataConfig", "DualPathConfig", "EvalSetConfig", "FinetuneConfig", "FinetuneSection", "GrpoConfig", "ModelConfig",
           "OptimConfig", "PosttrainConfig", "RawBoostConfig", "SamConfig", "ScheduleConfig", "Section",
           "StepModeDecl", "StreamConfig", "TrackingConfig", "TrainConfig", "apply_overrides", "blamed_override",
           "dump_config", "enabled_step_modes", "from_dict", "layerdrop_conflicts", "load_config", "load_yaml",
           "require", "require_choice", "resolved", "step_mode_declarations", "step_mode_sections", "to_dict",
           "unknown_key_hint"]
