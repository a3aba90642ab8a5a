"""Config sections of fine-tuning: where it starts, what it is tested on, and its defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from posttrain.config.schema import Conflict, Section, StepModeDecl, require, require_choice
from posttrain.config.training import (OptimConfig, PosttrainConfig, RawBoostConfig, ScheduleConfig,
                                       TrainConfig)

GRPO_VARIANTS = ("grpo3", "grpo2")

@dataclass
class EvalSetConfig(Section):
    """One fine-tune test set: a shard set of segments, reported per segment and per source file."""

    name: str  # report folder under <output_dir>/eval/ and the MLflow metric prefix, e.g. "4s"
    shards: str  # shard directory (index.json) of the test segments
    # segment -> file mapping (``posttrain data df2024``'s <N>s/segments.csv); None: file ids are read
    # from the segment id convention <file id>-<N>s-<k>
    segments_csv: str | None = None

    def validate(self) -> None:
        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty folder name")
        require(bool(self.shards), "shards", "must not be empty")


@dataclass
class FinetuneSection(Section):
    """Where a fine-tune starts and what it is tested on (``finetune.py``, ``posttrain.finetuning``)."""

    init_from: str = ""  # any posttrain.loading.load_model spec: checkpoint, export, release, hub id
    init_preset: str | None = None  # only to tell apart presets of identical shape in a release conversion
    # output folder of ``posttrain data df2024 --shards``: fills data.train.shards (when empty) with
    # shards/<train_segment_seconds>s/train and the test sets (when none are listed) with
    # shards/<N>s/test + <N>s/segments.csv for every N in eval_segment_seconds that was built
    df2024_dir: str | None = None
    train_segment_seconds: int = 13
    eval_segment_seconds: list[int] = field(default_factory=lambda: [4, 10, 13, 30, 50])
    test_sets: list[EvalSetConfig] = field(default_factory=list)
    file_aggregation: Literal["mean_logits", "max_fake"] = "mean_logits"  # segment outputs -> file output
    eval_window_seconds: float = 0.0  # 0: every test segment scored whole (the test protocol)
    eval_batch_seconds: float = 200.0  # padded audio seconds per inference forward pass
    evaluate: bool = True  # score the test sets once training ends
    # which checkpoint the test sets are scored with: "final" (the last one), or "best" (the lowest
    # validation EER; AntiDeepfake's choice, which validates on ASVspoof2019-LA dev: needs data.valid.shards)
    test_checkpoint: Literal["final", "best"] = "final"

    def validate(self) -> None:
        require(self.train_segment_seconds > 0, "train_segment_seconds", "must be > 0")
        require(all(n > 0 for n in self.eval_segment_seconds), "eval_segment_seconds", "must all be > 0")
        require(self.eval_window_seconds >= 0, "eval_window_seconds", "must be >= 0")
        require(self.eval_batch_seconds > 0, "eval_batch_seconds", "must be > 0")
        names = [test.name for test in self.test_sets]
        require(len(names) == len(set(names)), "test_sets", f"names must be unique, got {names}")


@dataclass
class GrpoConfig(Section):
    """GRPO fine-tuning as AntiDeepfake's ``algo/rl.py`` defines it (Interspeech 2026; posttrain.train.grpo).

    Per utterance the policy (train mode) samples ``sample_num`` labels from its own softmax; reward 1 where
    a label is the truth; advantages normalised over every sample of the batch (AD's code; ``normalise:
    group`` per utterance instead, the GRPO paper's); KL ``exp(ref - logp) - (ref - logp) - 1`` against
    the initial model weighted by ``beta``. ``grpo3`` (the paper's GRPO): clipped ratio against an old policy
    refreshed after every ``inner_step_size``-th optimiser step (AD counts batches: the same without
    gradient accumulation, which none of its recipes uses); ``grpo2`` (GRPO_s): no old policy, no clipping."""

    STEP_MODE: ClassVar[StepModeDecl] = StepModeDecl(
        "grpo", "posttrain.train.grpo",
        # the one-class head has no softmax over two labels to sample from
        conflicts=(Conflict("model.head", lambda cfg: cfg.model.head != "linear",
                            "grpo.enabled samples labels from the linear head's softmax: use model.head=linear"),))

    enabled: bool = False
    variant: Literal["grpo3", "grpo2"] = "grpo3"
    sample_num: int = 64  # labels sampled per utterance (AD: sample_num)
    beta: float = 0.04  # KL weight (AD's recipes; AD's code defaults to 1.0 when the key is absent)
    epsilon: float = 0.2  # grpo3's ratio clip
    std_floor: float = 1e-5  # added to the advantage's standard deviation
    inner_step_size: int = 1000  # grpo3: the old policy is refreshed after every this many optimiser steps
    normalise: Literal["batch", "group"] = "batch"

    def validate(self) -> None:
        require_choice(self.variant, "variant", list(GRPO_VARIANTS))
        require_choice(self.normalise, "normalise", ["batch", "group"])
        require(self.sample_num >= 1, "sample_num", "must be >= 1")
        require(self.normalise == "batch" or self.sample_num >= 2, "sample_num",
                "must be >= 2 with normalise=group (the standard deviation of one sample is undefined)")
        require(self.beta >= 0, "beta", "must be >= 0")
        require(0 < self.epsilon < 1, "epsilon", "must be in (0, 1)")
        require(self.std_floor > 0, "std_floor", "must be > 0")
        require(self.inner_step_size >= 1, "inner_step_size", "must be >= 1")


@dataclass
class FinetuneConfig(PosttrainConfig):
    """Post-training's schema with the Deepfake-Eval-2024 fine-tune defaults (AntiDeepfake: lr 1e-6,
    10 epochs, at most 50k steps, RawBoost algo 5) and the ``finetune`` section. The schedule here is a
    constant learning rate, posttrain's choice: AntiDeepfake's SFT configs keep the post-training
    schedule's 80k-step warm-up under the 50k-step limit, so its rate only ramps, reaching 6.25e-7 at
    the last step (configs/finetune/df2024_antideepfake.yaml restores that; docs/parity.md)."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=0, decay_end_steps=0,
                                                                            final_lr_ratio=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=50_000, max_epochs=10))
    rawboost: RawBoostConfig = field(default_factory=lambda: RawBoostConfig(enabled=True, algo=5))
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)

    def validate(self) -> None:
        super().validate()
        # checked here, not in the section: a section left out of the YAML is never validated on its own
        require(bool(self.finetune.init_from), "finetune.init_from",
                "required: the model to fine-tune (checkpoint, export, AntiDeepfake release or hub id)")
        require(self.model.pretrained is None, "model.pretrained",
                "must stay unset: a fine-tune starts from finetune.init_from")
        require(self.finetune.test_checkpoint != "best" or bool(self.data.valid.shards), "finetune.test_checkpoint",
                "'best' needs a validation set (data.valid.shards, e.g. ASVspoof2019-LA dev), or use 'final'")
