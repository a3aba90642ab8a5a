"""Typed configuration: one dataclass per component, composed into ``PosttrainConfig``.

Every section validates itself; a bad value raises ``ConfigError`` (a ``ValueError``) whose message
starts with the full dotted key, e.g. ``train.zero_stage: must be one of [1, 2, 3], got 4``.
YAML presets live in ``configs/``; ``key=value`` overrides use dotted keys and YAML values.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ConfigT = typing.TypeVar("ConfigT")


SAMPLE_RATE_HZ = 16_000  # the one rate of shards, batches and models (every SSL backbone here is 16 kHz)


# a number like 1e-6 or 5E+3, which YAML 1.1 (PyYAML) leaves a string because it has no dot
YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


class ConfigError(ValueError):
    """A configuration problem at a dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def require_choice(value: Any, key: str, choices: typing.Iterable[Any]) -> None:
    choices = list(choices)
    require(value in choices, key, f"must be one of {choices}, got {value!r}")


# ----------------------------------------------------------------------------------------------- data


@dataclass
class CropConfig:
    """How training/validation audio is cut. ``antideepfake``: files longer than
    ``crop_above_seconds`` get one random crop of uniform length in [min_seconds, max_seconds]."""

    policy: Literal["antideepfake", "fixed", "none"] = "antideepfake"
    crop_above_seconds: float = 13.0
    min_seconds: float = 10.0
    max_seconds: float = 13.0
    fixed_seconds: float = 4.0

    def validate(self) -> None:
        require_choice(self.policy, "policy", ["antideepfake", "fixed", "none"])
        require(self.min_seconds > 0, "min_seconds", "must be > 0")
        require(self.max_seconds >= self.min_seconds, "max_seconds", "must be >= min_seconds")
        require(self.fixed_seconds > 0, "fixed_seconds", "must be > 0")


@dataclass
class StreamConfig:
    """Streaming loader over WebDataset shard sets (see ``posttrain.data.stream``)."""

    shards: list[str] = field(default_factory=list)  # shard directories (each with index.json)
    weights: list[float] = field(default_factory=list)  # per shard set; empty = all 1.0
    sample_rate_hz: int = SAMPLE_RATE_HZ
    max_batch_seconds: float = 100.0  # padded audio seconds (B x longest) per batch per rank
    max_batch_size: int = 64
    num_buckets: int = 20
    # fitted: edges fitted to the index durations (low padding); uniform: equal widths; antideepfake:
    # AD's log-normal edges with int(max_batch_seconds / edge) items per bucket (see data/batching.py)
    bucket_policy: Literal["fitted", "uniform", "antideepfake"] = "fitted"
    shuffle_buffer: int = 1000  # samples: a sample leaves the read order by at most this many places
    interleave_shards: int = 4  # shards each worker reads at once, so every batch mixes several shards
    num_workers: int = 2
    # fork starts workers in milliseconds (they only read and decode); spawn re-imports torch per worker
    worker_start_method: Literal["fork", "spawn", "forkserver"] = "fork"
    seed: int = 1234
    crop: CropConfig = field(default_factory=CropConfig)
    # shard sets behind URLs or pipe: commands: failures in a row per file, first back-off (doubling)
    read_attempts: int = 8
    read_backoff_seconds: float = 0.5
    read_timeout_seconds: float = 60.0  # an HTTP connection silent this long is dropped and retried

    def validate(self) -> None:
        require(not self.weights or len(self.weights) == len(self.shards), "weights",
                f"needs one weight per shard set ({len(self.shards)}), got {len(self.weights)}")
        require(all(w > 0 for w in self.weights), "weights", "must all be > 0")
        require(self.sample_rate_hz > 0, "sample_rate_hz", "must be > 0")
        require(self.max_batch_seconds > 0, "max_batch_seconds", "must be > 0")
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        require(self.num_buckets >= 1, "num_buckets", "must be >= 1")
        require_choice(self.bucket_policy, "bucket_policy", ["fitted", "uniform", "antideepfake"])
        require(self.shuffle_buffer >= 0, "shuffle_buffer", "must be >= 0")
        require(self.interleave_shards >= 1, "interleave_shards", "must be >= 1")
        require(self.num_workers >= 0, "num_workers", "must be >= 0")
        require_choice(self.worker_start_method, "worker_start_method", ["fork", "spawn", "forkserver"])
        require(self.read_attempts >= 1, "read_attempts", "must be >= 1")
        require(self.read_backoff_seconds >= 0, "read_backoff_seconds", "must be >= 0")
        require(self.read_timeout_seconds > 0, "read_timeout_seconds", "must be > 0")


@dataclass
class DataConfig:
    train: StreamConfig = field(default_factory=StreamConfig)
    valid: StreamConfig = field(default_factory=lambda: StreamConfig(shuffle_buffer=0, num_workers=0))


# ---------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    preset: str = "tiny"  # see posttrain.models.presets.PRESETS
    pretrained: str | None = None  # hub id or local path of SSL weights; None = random init
    gradient_checkpointing: bool = False
    mask_time_prob: float = 0.0  # SpecAugment time masking during training; 0 = off
    mask_time_length: int = 10
    # Encoder regularisation. None = the preset's AntiDeepfake value (its W2V_configs.py: wav2vec 2.0 small
    # 0.1/0.1/0.1 dropout, LayerDrop 0.05, feature_grad_mult 0.1; MMS-1B, XLS-R-1B/2B input dropout 0.1;
    # the others 0). A preset's LayerDrop is turned off where it conflicts (layerdrop_conflicts).
    hidden_dropout: float | None = None  # fairseq "dropout": residual and post-position-embedding dropout
    attention_dropout: float | None = None
    activation_dropout: float | None = None  # inside the feed-forward block
    input_dropout: float | None = None  # fairseq "dropout_input": after the feature projection
    layerdrop: float | None = None
    feature_grad_mult: float | None = None  # gradient scale into the conv feature extractor (fairseq)
    freeze_feature_encoder: bool = False
    # AntiDeepfake's training batches: zero padding unmasked through the encoder and into the mean
    # (training only; validation and scoring always mask padding). Off: padding never reaches the pool.
    pool_over_padding: bool = False
    # eps of the per-utterance input normalisation, (x - mean) / sqrt(var + eps). None = the model's own:
    # 1e-7 (transformers' feature extractor) for a new model, AntiDeepfake's 1e-5 for a converted release
    # and models fine-tuned from one. 1e-5 trains a new model with AntiDeepfake's normalisation.
    input_norm_eps: float | None = None
    # self-attention kernel, chosen explicitly: sdpa (torch's fused kernels, memory linear in frames),
    # flash_attention_2 (needs the flash-attn package, CUDA and bf16), eager (the reference maths)
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    compile: bool = False  # torch.compile the encoder's transformer layers (posttrain.models.detector)

    def validate(self) -> None:
        require_choice(self.attn_implementation, "attn_implementation", ["sdpa", "flash_attention_2", "eager"])
        require(0.0 <= self.mask_time_prob < 1.0, "mask_time_prob", "must be in [0, 1)")
        require(self.mask_time_length >= 1, "mask_time_length", "must be >= 1")
        for key in ("hidden_dropout", "attention_dropout", "activation_dropout", "input_dropout", "layerdrop"):
            value = getattr(self, key)
            require(value is None or 0.0 <= value < 1.0, key, "must be in [0, 1) (or null: the preset's value)")
        require(self.feature_grad_mult is None or self.feature_grad_mult > 0, "feature_grad_mult",
                "must be > 0 (or null: the preset's value); freeze the extractor with freeze_feature_encoder")
        require(self.input_norm_eps is None or self.input_norm_eps > 0, "input_norm_eps",
                "must be > 0 (or null: the model's own)")


# ----------------------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    lr: float = 1e-7
    weight_decay: float = 0.01
    eps: float = 1e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip_norm: float = 100.0  # 0 disables clipping

    def validate(self) -> None:
        require(self.lr >= 0, "lr", "must be >= 0")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.eps > 0, "eps", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                "must be two numbers in [0, 1)")
        require(self.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0")


@dataclass
class ScheduleConfig:
    """Linear warm-up to ``optim.lr`` over ``warmup_steps``, then exponential decay reaching
    ``final_lr_ratio * lr`` at ``decay_end_steps`` (held constant after)."""

    warmup_steps: int = 80_000
    decay_end_steps: int = 800_000
    final_lr_ratio: float = 0.01

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.decay_end_steps >= self.warmup_steps, "decay_end_steps", "must be >= warmup_steps")
        require(0 < self.final_lr_ratio <= 1, "final_lr_ratio", "must be in (0, 1]")


@dataclass
class SamConfig:
    """Sharpness-aware minimisation (Foret et al.; ASAM: Kwon et al.)."""

    enabled: bool = False
    rho: float = 0.005
    adaptive: bool = False
    adaptive_eta: float = 0.01  # ASAM's T = |w| + eta
    variant: Literal["sam", "looksam", "esam"] = "sam"
    looksam_every_steps: int = 5  # LookSAM: full SAM step every k steps
    looksam_alpha: float = 0.7
    # ESAM (Du et al., ICLR 2022): perturb this fraction of the weights (stochastic weight perturbation,
    # the kept part of e scaled by 1/fraction) and run the second pass on this fraction of the samples,
    # those whose loss rose most under the perturbation (sharpness-sensitive data selection)
    esam_weight_fraction: float = 0.5
    esam_data_fraction: float = 0.5

    def validate(self) -> None:
        require(self.rho > 0, "rho", "must be > 0")
        require(self.adaptive_eta >= 0, "adaptive_eta", "must be >= 0")
        require_choice(self.variant, "variant", ["sam", "looksam", "esam"])
        require(self.looksam_every_steps >= 1, "looksam_every_steps", "must be >= 1")
        require(self.looksam_alpha >= 0, "looksam_alpha", "must be >= 0")
        require(0 < self.esam_weight_fraction <= 1, "esam_weight_fraction", "must be in (0, 1]")
        require(0 < self.esam_data_fraction <= 1, "esam_data_fraction", "must be in (0, 1]")


@dataclass
class RawBoostConfig:
    """RawBoost (Tak et al., ICASSP 2022); defaults are the reference code's."""

    enabled: bool = False
    algo: int = 5
    n_f: int = 5
    n_bands: int = 5
    min_f_hz: float = 20.0
    max_f_hz: float = 8000.0
    min_bw_hz: float = 100.0
    max_bw_hz: float = 1000.0
    min_coeff: int = 10
    max_coeff: int = 100
    min_g_db: float = 0.0
    max_g_db: float = 0.0
    min_bias_db: float = 5.0
    max_bias_db: float = 20.0
    p_percent: float = 10.0
    g_sd: float = 2.0
    snr_min_db: float = 10.0
    snr_max_db: float = 40.0
    seed: int = 1234
    sample_rate_hz: int = SAMPLE_RATE_HZ  # the notch filters are designed for this rate (reference: 16 kHz)

    def validate(self) -> None:
        require(self.algo in range(9), "algo", f"must be in 0..8, got {self.algo!r}")
        require(self.n_f >= 1, "n_f", "must be >= 1")
        require(self.n_bands >= 1, "n_bands", "must be >= 1")
        require(0 < self.min_f_hz <= self.max_f_hz, "max_f_hz", "must be >= min_f_hz > 0")
        require(0 < self.min_bw_hz <= self.max_bw_hz, "max_bw_hz", "must be >= min_bw_hz > 0")
        require(3 <= self.min_coeff <= self.max_coeff, "max_coeff", "must be >= min_coeff >= 3")
        require(self.min_g_db <= self.max_g_db, "max_g_db", "must be >= min_g_db")
        require(self.min_bias_db <= self.max_bias_db, "max_bias_db", "must be >= min_bias_db")
        require(0 <= self.p_percent <= 100, "p_percent", "must be in [0, 100]")
        require(self.snr_min_db <= self.snr_max_db, "snr_max_db", "must be >= snr_min_db")
        require(self.sample_rate_hz > 0, "sample_rate_hz", "must be > 0")


@dataclass
class DualPathConfig:
    """Dual-path data augmentation with gradient alignment (DPDA; ``posttrain.train.dual_path``).

    Each step runs every micro-batch clean and RawBoost-augmented (``rawboost_algo`` with the other
    ``rawboost.*`` parameters; ``rawboost.enabled`` is ignored, the clean path stays clean) and
    combines the two gradients with ``method``.

    Not combinable with ``sam``: SAM needs ONE gradient to perturb along and one to update with, and a
    dual-path step has two, aligned non-linearly (the combination depends on their cosine); perturbing
    along the aligned gradient and aligning again at ``w + e`` has no published definition or
    evidence, and costs four forward/backward passes per step.
    """

    enabled: bool = False
    method: Literal["pcgrad", "gradvac", "cagrad", "sum", "mean"] = "pcgrad"
    gradvac_beta: float = 0.5
    # DPDA's code moves GradVac's target cosine only on steps with a positive cosine (so it stays >= 0);
    # the GradVac paper (Wang et al., 2021) updates it on every step: set false for that.
    gradvac_ema_positive_only: bool = True
    cagrad_c: float = 0.5
    rawboost_algo: int = 4

    def validate(self) -> None:
        require_choice(self.method, "method", ["pcgrad", "gradvac", "cagrad", "sum", "mean"])
        require(0 <= self.gradvac_beta <= 1, "gradvac_beta", "must be in [0, 1]")
        require(self.cagrad_c >= 0, "cagrad_c", "must be >= 0")
        require(self.rawboost_algo in range(1, 9), "rawboost_algo", "must be in 1..8")


@dataclass
class TrainConfig:
    max_steps: int = 800_000  # optimiser steps
    max_epochs: int = 30
    grad_accum_steps: int = 1
    zero_stage: int = 2
    # bf16 (posttrain's choice: no loss scaling, no overflow-skipped steps), fp16 with DeepSpeed's dynamic
    # loss scaling as AntiDeepfake's torch GradScaler (init 2^16, halve on overflow, double after 2000
    # clean steps; plain steps only), or fp32
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 1234
    max_consecutive_skips: int = 10  # non-finite steps in a row before training stops
    log_every_steps: int = 10
    valid_every_steps: int = 1000  # 0 = only at the end of each epoch
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": sam / dual_path / plain from those sections; or any mode registered in posttrain.train.step
    step_mode: str = "auto"
    # ZeRO communication (posttrain.train.trainer.deepspeed_config): overlap the gradient reduction with
    # the backward (null = on for CUDA, off on CPU where there is no stream to overlap with); bucket
    # sizes in elements (DeepSpeed's default 5e8 costs 1 GB per bf16 bucket, two with overlap)
    overlap_comm: bool | None = None
    reduce_bucket_elements: int = 200_000_000
    allgather_bucket_elements: int = 200_000_000
    # deep-merged last into the DeepSpeed config the engine generates (posttrain.train.trainer)
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        require(self.max_steps >= 1, "max_steps", "must be >= 1")
        require(self.max_epochs >= 1, "max_epochs", "must be >= 1")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", "must be >= 1")
        require_choice(self.zero_stage, "zero_stage", [1, 2, 3])  # the skip logic relies on ZeRO's norm check
        require_choice(self.precision, "precision", ["bf16", "fp16", "fp32"])
        require(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")
        require(self.log_every_steps >= 1, "log_every_steps", "must be >= 1")
        require(self.valid_every_steps >= 0, "valid_every_steps", "must be >= 0")
        require(bool(self.step_mode), "step_mode", "must not be empty (auto, plain, sam, dual_path, ...)")
        require(self.reduce_bucket_elements >= 1, "reduce_bucket_elements", "must be >= 1")
        require(self.allgather_bucket_elements >= 1, "allgather_bucket_elements", "must be >= 1")
        require_choice(self.device, "device", ["auto", "cpu", "cuda"])


@dataclass
class CheckpointConfig:
    every_steps: int = 5000  # 0 = off
    every_minutes: float = 60.0  # 0 = off
    keep_last: int = 3
    resume: str = "auto"  # auto (from <output_dir>/checkpoints/latest if present) | none | a tag dir

    def validate(self) -> None:
        require(self.every_steps >= 0, "every_steps", "must be >= 0")
        require(self.every_minutes >= 0, "every_minutes", "must be >= 0")
        require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "posttrain"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class PosttrainConfig:
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    rawboost: RawBoostConfig = field(default_factory=RawBoostConfig)
    dual_path: DualPathConfig = field(default_factory=DualPathConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.output_dir), "output_dir", "must not be empty")
        conflicts = layerdrop_conflicts(self)
        if self.model.layerdrop and conflicts:
            raise ConfigError("model.layerdrop", f"LayerDrop cannot be combined with {' and '.join(conflicts)} "
                              "(SAM's two passes must run the same layers; ZeRO-3 and activation checkpointing "
                              "run every layer); set model.layerdrop=0")
        if self.sam.enabled and self.dual_path.enabled:
            raise ConfigError("dual_path.enabled", "cannot be combined with sam.enabled")
        for section, enabled in (("sam", self.sam.enabled), ("dual_path", self.dual_path.enabled)):
            # an overflow-skipped fp16 step would leave SAM's weights perturbed / the two paths' gradients unscaled
            require(not (enabled and self.train.precision == "fp16"), "train.precision",
                    f"fp16 (loss scaling) cannot be combined with {section}.enabled: use bf16 or fp32")


def layerdrop_conflicts(cfg: PosttrainConfig) -> list[str]:
    """The settings LayerDrop cannot be combined with: a preset's LayerDrop is turned off under them, an
    explicit ``model.layerdrop`` is refused."""
    return [key for key, on in (("sam.enabled", cfg.sam.enabled), ("train.zero_stage=3", cfg.train.zero_stage == 3),
                                ("model.gradient_checkpointing", cfg.model.gradient_checkpointing)) if on]


# ------------------------------------------------------------------------------------------ fine-tune


@dataclass
class EvalSetConfig:
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
class FinetuneSection:
    """Where a fine-tune starts and what it is tested on (``finetune.py``, ``posttrain.train.finetune``)."""

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

    def validate(self) -> None:
        super().validate()
        # checked here, not in the section: a section left out of the YAML is never validated on its own
        require(bool(self.finetune.init_from), "finetune.init_from",
                "required: the model to fine-tune (checkpoint, export, AntiDeepfake release or hub id)")
        require(self.model.pretrained is None, "model.pretrained",
                "must stay unset: a fine-tune starts from finetune.init_from")
        require(self.finetune.test_checkpoint != "best" or bool(self.data.valid.shards), "finetune.test_checkpoint",
                "'best' needs a validation set (data.valid.shards, e.g. ASVspoof2019-LA dev), or use 'final'")


# ------------------------------------------------------------------------------------------ machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (building nested dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as error:
                errors.append(error.message)
        raise ConfigError(key, "; ".join(errors))
    if origin is Literal:
        require_choice(value, key, typing.get_args(tp))
        return value
    if origin is list:
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float:
        if isinstance(value, str) and YAML11_EXPONENT.fullmatch(value):
            return float(value)  # 1e-6: YAML 1.1 reads an exponent without a dot as a string
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")


def unknown_key_hint(key: str, names) -> str:
    """"unknown key (did you mean 'max_steps'?)", or the known keys when none is near."""
    import difflib

    near = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    return f"unknown key (did you mean {near[0]!r}?)" if near else f"unknown key (known: {sorted(names)})"


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(_join(prefix, key), unknown_key_hint(str(key), names))
    kwargs = {name: _coerce(value, hints[name], _join(prefix, name)) for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as error:
            raise ConfigError(_join(prefix, error.key), error.message) from None
    return obj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    """The YAML a run saves (checkpoints, run folder): ``load_config`` reads it back to an equal config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(override, "override must look like section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(key, f"the value in the command line override {override!r} is not valid YAML "
                                   "(quote it, e.g. key='[a, b]')") from None
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with path.open() as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError("", f"{where}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                cls: type = PosttrainConfig) -> Any:
    """Defaults <- YAML file <- ``key=value`` overrides, validated. An error names where its key was
    set: the command line override when one set it (a typo there is not the YAML's), else the file."""
    overrides = list(overrides)
    data = load_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        override = blamed_override(error.key, overrides)
        if override is not None:
            where = f" (set on the command line by {override!r}: fix or drop that override)"
        else:
            where = f" (in {path})" if path is not None else ""
        raise ConfigError(error.key, error.message + where) from None


def blamed_override(key: str, overrides: typing.Iterable[str]) -> str | None:
    """The last ``key=value`` override that set ``key``, a value inside it, or a section on its path."""
    for override in reversed(list(overrides)):
        set_key = override.partition("=")[0].strip()
        inside = key.startswith((f"{set_key}.", f"{set_key}["))  # a value inside what it set
        if set_key and (key == set_key or set_key.startswith(f"{key}.") or inside):
            return override
    return None


def resolved(cfg: ConfigT, values: typing.Mapping[str, Any]) -> ConfigT:
    """A new, validated copy of ``cfg`` with the dotted keys of ``values`` set: what a run learns once its
    config is valid (the ZeRO stage accelerate chose, the preset and normalisation of the model a
    fine-tune starts from). ``cfg`` itself is never changed after validation."""
    data = to_dict(cfg)
    for key, value in values.items():
        node = data
        *sections, name = key.split(".")
        for section in sections:
            node = node[section]
        if name not in node:
            raise ConfigError(key, "unknown key")
        node[name] = value
    return from_dict(type(cfg), data)
