"""Config sections of post-training: model, optimiser, schedule, step modes (SAM, dual path), RawBoost,
trainer, checkpoints and tracking, composed into ``PosttrainConfig``."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from posttrain.config.schema import (SAMPLE_RATE_HZ, ConfigError, Conflict, Section, StepModeDecl, _hints,
                                     require, require_choice)

from posttrain.config.data import DataConfig

@dataclass
class ModelConfig(Section):
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
    # self-attention kernel: auto (the backbone family's first: sdpa, torch's fused kernels with memory
    # linear in frames, for wav2vec 2.0 and HuBERT; eager for WavLM), or one the family supports:
    # sdpa, flash_attention_2 (needs the flash-attn package, CUDA and bf16), eager (the reference maths)
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    compile: bool = False  # torch.compile the encoder's transformer layers (posttrain.models.detector)
    # the classifier on the pooled embedding: "linear" (two logits [fake, real], AntiDeepfake's proj_fc) or
    # "oc_softmax" (AntiDeepfake's one-class softmax, Zhang et al. 2021: one renormalised weight vector,
    # score = cosine, trained with margins oc_margin_real / oc_margin_fake and scale oc_scale)
    head: Literal["linear", "oc_softmax"] = "linear"
    oc_margin_real: float = 0.9  # AD's w_posi
    oc_margin_fake: float = 0.2  # AD's w_nega
    oc_scale: float = 20.0  # AD's alpha

    def validate(self) -> None:
        require_choice(self.attn_implementation, "attn_implementation", ["auto", "sdpa", "flash_attention_2", "eager"])
        require(0.0 <= self.mask_time_prob < 1.0, "mask_time_prob", "must be in [0, 1)")
        require(self.mask_time_length >= 1, "mask_time_length", "must be >= 1")
        for key in ("hidden_dropout", "attention_dropout", "activation_dropout", "input_dropout", "layerdrop"):
            value = getattr(self, key)
            require(value is None or 0.0 <= value < 1.0, key, "must be in [0, 1) (or null: the preset's value)")
        require(self.feature_grad_mult is None or self.feature_grad_mult > 0, "feature_grad_mult",
                "must be > 0 (or null: the preset's value); freeze the extractor with freeze_feature_encoder")
        require(self.input_norm_eps is None or self.input_norm_eps > 0, "input_norm_eps",
                "must be > 0 (or null: the model's own)")
        require_choice(self.head, "head", ["linear", "oc_softmax"])
        require(-1.0 < self.oc_margin_fake < self.oc_margin_real < 1.0, "oc_margin_real",
                "must satisfy -1 < oc_margin_fake < oc_margin_real < 1")
        require(self.oc_scale > 0, "oc_scale", "must be > 0")


# ----------------------------------------------------------------------------------------- training


@dataclass
class OptimConfig(Section):
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
class ScheduleConfig(Section):
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
class SamConfig(Section):
    """Sharpness-aware minimisation (Foret et al.; ASAM: Kwon et al.)."""

    STEP_MODE: ClassVar[StepModeDecl] = StepModeDecl(
        "sam", "posttrain.train.sam", edits_partitions=True, breaks_layerdrop=True,
        # an overflow-skipped fp16 step would leave the weights perturbed
        conflicts=(Conflict("train.precision", lambda cfg: cfg.train.precision == "fp16",
                            "fp16 (loss scaling) cannot be combined with sam.enabled: use bf16 or fp32"),))

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
class RawBoostConfig(Section):
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
class DualPathConfig(Section):
    """Dual-path data augmentation with gradient alignment (DPDA; ``posttrain.train.dual_path``).

    Each step runs every micro-batch clean and RawBoost-augmented (``rawboost_algo`` with the other
    ``rawboost.*`` parameters; ``rawboost.enabled`` is ignored, the clean path stays clean) and
    combines the two gradients with ``method``.

    Not combinable with ``sam``: SAM needs ONE gradient to perturb along and one to update with, and a
    dual-path step has two, aligned non-linearly (the combination depends on their cosine); perturbing
    along the aligned gradient and aligning again at ``w + e`` has no published definition or
    evidence, and costs four forward/backward passes per step.
    """

    STEP_MODE: ClassVar[StepModeDecl] = StepModeDecl(
        "dual_path", "posttrain.train.dual_path", edits_partitions=True,
        # an overflow-skipped fp16 step would leave the two paths' gradients unscaled
        conflicts=(Conflict("train.precision", lambda cfg: cfg.train.precision == "fp16",
                            "fp16 (loss scaling) cannot be combined with dual_path.enabled: use bf16 or fp32"),))

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
class TrainConfig(Section):
    max_steps: int = 800_000  # optimiser steps
    max_epochs: int = 30
    grad_accum_steps: int = 1
    zero_stage: int = 2
    # ZeRO-3 only: build the model straight into its partitions and load weights into them module by module
    # (posttrain.models.partitioned), so no rank holds the whole model; false: every rank builds it in full
    # first and DeepSpeed partitions it at initialize (the former start-up, 4 bytes per parameter per rank)
    partitioned_init: bool = True
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
class CheckpointConfig(Section):
    every_steps: int = 5000  # 0 = off
    every_minutes: float = 60.0  # 0 = off
    keep_last: int = 3
    resume: str = "auto"  # auto (from <output_dir>/checkpoints/latest if present) | none | a tag dir
    # the scheduler's warning before a time limit or preemption (sbatch --signal=B:USR1@N, forwarded to
    # every rank): the ranks agree on it at the end of the step, write a checkpoint and stop; null = ignore
    stop_signal: str | None = "SIGUSR1"

    def validate(self) -> None:
        require(self.every_steps >= 0, "every_steps", "must be >= 0")
        require(self.every_minutes >= 0, "every_minutes", "must be >= 0")
        require(self.keep_last >= 1, "keep_last", "must be >= 1")
        if self.stop_signal is not None:
            if not self.stop_signal.startswith("SIG"):  # SLURM's spelling (USR1) is accepted too
                self.stop_signal = f"SIG{self.stop_signal}"
            catchable = {s.name for s in signal.Signals} - {"SIGKILL", "SIGSTOP"}
            require(self.stop_signal in catchable, "stop_signal",
                    f"must be a catchable signal name such as SIGUSR1, or null to ignore signals; got {self.stop_signal!r}")


@dataclass
class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "posttrain"
    run_name: str | None = None
    system_metrics: bool = True


@dataclass
class PosttrainConfig(Section):
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
        enabled = enabled_step_modes(self)
        if len(enabled) > 1:
            raise ConfigError(f"{enabled[1][0]}.enabled", f"cannot be combined with {enabled[0][0]}.enabled")
        for _, decl in enabled:
            for conflict in decl.conflicts:
                require(not conflict.applies(self), conflict.key, conflict.reason)


def step_mode_sections(schema: Any) -> list[tuple[str, type]]:
    """``(key, section class)`` of every section of a config (or config class) that turns a step mode on,
    i.e. declares ``STEP_MODE``, in field order."""
    cls = schema if isinstance(schema, type) else type(schema)
    hints = _hints(cls)
    return [(spec.name, hints[spec.name]) for spec in fields(cls)
            if isinstance(hints[spec.name], type) and hasattr(hints[spec.name], "STEP_MODE")]


def enabled_step_modes(cfg: Any) -> list[tuple[str, StepModeDecl]]:
    """``(section key, declaration)`` of the step modes ``cfg`` turns on, in field order."""
    return [(name, section.STEP_MODE) for name, section in step_mode_sections(cfg) if getattr(cfg, name).enabled]


def step_mode_declarations(schema: Any) -> dict[str, StepModeDecl]:
    """Every step mode a config (or config class) can turn on, by name."""
    return {section.STEP_MODE.name: section.STEP_MODE for _, section in step_mode_sections(schema)}


def layerdrop_conflicts(cfg: PosttrainConfig) -> list[str]:
    """The settings LayerDrop cannot be combined with: a preset's LayerDrop is turned off under them, an
    explicit ``model.layerdrop`` is refused."""
    modes = [f"{name}.enabled" for name, decl in enabled_step_modes(cfg) if decl.breaks_layerdrop]
    return modes + [key for key, on in (("train.zero_stage=3", cfg.train.zero_stage == 3),
                                        ("model.gradient_checkpointing", cfg.model.gradient_checkpointing)) if on]
