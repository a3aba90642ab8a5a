"""Post-training with DeepSpeed: the ``Trainer`` (engine set-up, the ``train(cfg)`` loop, validation,
checkpoint cadence); ``self.engine`` is the DeepSpeed engine it drives.

The loop is short on purpose: it groups the loader's batches into ``grad_accum_steps`` micro-batches,
calls the configured step mode (``posttrain.train.step``) once per optimiser step, and around it
logs, validates, and writes collective checkpoints (``posttrain.train.checkpoint``). Every decision
that leads to a collective (stop, validate, save) is taken identically on every rank: from step
counts, from all-reduced values, or broadcast from rank 0 (the wall-clock checkpoint timer).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from posttrain.config import ConfigError, PosttrainConfig, dump_config, layerdrop_conflicts, to_dict
from posttrain.data.batch import Batch
from posttrain.data.files import write_text_atomic
from posttrain.dist import (all_gather_objects, all_reduce_sum, broadcast_flag, choose_device, collective_device,
                            start_process_group)
from posttrain.train import checkpoint as ckpt
from posttrain.train.engine_config import builds_in_partitions, check_precision_supported, deepspeed_config
from posttrain.train.rng import rng_preserved
from posttrain.train.run_lock import acquire_run_lock
from posttrain.train.schedule import build_scheduler
from posttrain.train.step import (SkippableAdamW, StepContext, StepStats, dummy_batch, get_step_mode, make_augment,
                                  model_inputs, set_up_step_mode, step_mode_name)
from posttrain.train.stop import SignalStop, StopRequest, clear_stopped, write_stopped
from posttrain.train.tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised on every rank after ``train.max_consecutive_skips`` non-finite steps in a row."""


@dataclass
class Progress:
    """Counters saved in every checkpoint."""

    step: int = 0  # optimiser steps taken (skipped ones included)
    epoch: int = 0  # the epoch in progress
    samples: int = 0  # global training samples seen
    audio_seconds: float = 0.0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    best_valid_eer: float | None = None
    best_tag: str | None = None
    last_valid_eer: float | None = None


@dataclass
class TrainResult:
    progress: Progress
    output_dir: Path
    last_checkpoint: Path | None
    mlflow_run_id: str | None
    history: list[dict[str, float]] = field(default_factory=list)  # one row per logged step
    stopped: SignalStop | None = None  # the run stopped early, checkpointed, on the scheduler's signal


# ------------------------------------------------------------------------------------------ set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: PosttrainConfig, device: torch.device | None = None) -> SkippableAdamW:
    """The client AdamW; the fused (one kernel per step) implementation on CUDA."""
    optim = cfg.optim
    fused = device is not None and device.type == "cuda"
    return SkippableAdamW([p for p in model.parameters() if p.requires_grad], lr=optim.lr,
                          betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, fused=fused)


# ---------------------------------------------------------------------------------------- validation


def evaluate_validation(engine: Any, cfg: PosttrainConfig, device: torch.device) -> tuple[float, int]:
    """(EER, samples) on ``data.valid``, scores = logit_real - logit_fake gathered from every rank.
    Collective. Join batches forward the dummy input so ZeRO-3's gathers stay in lockstep."""
    from posttrain.data.stream import ShardStream
    from posttrain.eval.metrics import eer, split_classes

    stream = ShardStream(cfg.data.valid)  # fresh each time: its state would mark everything consumed
    scores: list[float] = []
    labels: list[int] = []
    engine.eval()
    try:
        with torch.no_grad():
            for batch in stream:
                if batch.is_empty:
                    dummy = dummy_batch(cfg.data.valid.sample_rate_hz, device)
                    engine(dummy.waveforms, dummy.lengths)
                    continue
                batch = model_inputs(batch.to(device), engine.module.input_eps)
                logits = engine(batch.waveforms, batch.lengths).float()
                scores += (logits[:, 1] - logits[:, 0]).tolist()
                labels += batch.labels.tolist()
    finally:
        engine.train()
    gathered = all_gather_objects((scores, labels))
    all_scores = [s for part, _ in gathered for s in part]
    all_labels = [y for _, part in gathered for y in part]
    try:
        bona, spoof = split_classes(all_scores, all_labels)
        value, _ = eer(bona, spoof)
    except ValueError as error:
        raise ValueError(f"data.valid: cannot compute the validation EER on {cfg.data.valid.shards}: {error}") from None
    return value, len(all_scores)


# -------------------------------------------------------------------------------------------- the loop


def micro_batch_groups(batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of ``size`` batches; a short last group is padded with join batches (the
    loader yields the same number of batches on every rank, so every rank pads alike)."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:  # every rank pads the same slots, so their global counts are known to be zero
        yield group + [Batch.empty(global_counts=(0, 0)) for _ in range(size - len(group))]


class _Meter:
    """Sums of step statistics between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = self.applied = 0
        self.loss = self.samples = self.seconds = 0.0
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.samples += stats.samples
        self.seconds += stats.audio_seconds
        if not stats.skipped:
            self.applied += 1
            self.loss += stats.loss

    def metrics(self, stats: StepStats, progress: Progress) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {"train/loss": self.loss / self.applied if self.applied else float("nan"),
                   "train/lr": stats.lr, "train/grad_norm": stats.grad_norm,
                   "train/audio_seconds_per_s": self.seconds / elapsed, "train/samples_per_s": self.samples / elapsed,
                   "train/skipped_steps": progress.skipped_steps, "train/epoch": progress.epoch,
                   "train/samples": progress.samples}
        return metrics


def check_data_sets(cfg: PosttrainConfig) -> None:
    """Every shard set of the run can serve its role (indexed, non-empty, a validation set with both
    classes, no rows of another split): ``ConfigError`` naming the key and the folder otherwise."""
    from posttrain.data.shards import ShardFormatError, check_shard_set

    for role in ("train", "valid"):
        for i, directory in enumerate(getattr(cfg.data, role).shards):
            try:
                check_shard_set(directory, role)
            except ShardFormatError as error:
                raise ConfigError(f"data.{role}.shards[{i}]", str(error)) from None


# DeepSpeed lines that tell a posttrain user nothing: ZeRO calls every client optimizer "untested", and
# posttrain always trains with its own SkippableAdamW (whose ZeRO steps tests/dist checks).
DEEPSPEED_NOISE = ("You are using ZeRO with an untested optimizer",)


class _DropDeepSpeedNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in DEEPSPEED_NOISE)


def silence_deepspeed_noise() -> None:
    """Drop ``DEEPSPEED_NOISE`` from DeepSpeed's logger (once per process)."""
    from deepspeed.utils import logger

    if not any(isinstance(existing, _DropDeepSpeedNoise) for existing in logger.filters):
        logger.addFilter(_DropDeepSpeedNoise())


class Trainer:
    """The state of one training run; ``train(cfg)`` is the entry point."""

    def __init__(self, cfg: PosttrainConfig, device: torch.device | None = None):
        """``device`` given: the process group is already up (e.g. accelerate's); else it is started."""
        self.cfg = cfg
        check_data_sets(cfg)  # a one-line error now, not a traceback after the first epoch
        if device is None:
            device = choose_device(cfg.train.device)
            check_precision_supported(cfg.train.precision, device)  # before any process group exists
            start_process_group(device, deepspeed=True)
        else:
            check_precision_supported(cfg.train.precision, device)
        self.device = device
        self.rank, self.world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        self.output_dir = Path(cfg.output_dir)
        self.root = ckpt.checkpoint_root(self.output_dir)
        self.run_lock = acquire_run_lock(self.output_dir, self.rank)
        # from here on, a scheduler's warning (even one during set-up) ends in a checkpoint
        self.progress = Progress()  # before the handler that reads it
        self.stop = StopRequest(cfg.checkpoint.stop_signal, lambda: self.progress.step).install()
        try:
            self._set_up()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another run write into the output folder (the end of ``fit``, or a failed set-up); hand
        the stop signal back to whoever had it before."""
        self.stop.restore()
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def _set_up(self) -> None:
        from posttrain.data.stream import ShardStream

        cfg = self.cfg
        resume = ckpt.find_resume(cfg.checkpoint.resume, self.output_dir)
        metadata = ckpt.read_metadata(resume) if resume is not None else None
        seed_everything(cfg.train.seed)  # identical initial weights on every rank
        self.model, self.cfg = self._build_model(metadata)
        cfg = self.cfg  # resolved for the model (e.g. a fine-tune takes the loaded model's preset)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        universal = metadata is not None and metadata["world_size"] != self.world_size
        if universal:
            ckpt.convert_to_universal(resume)
        silence_deepspeed_noise()
        self.engine = self._build_engine(universal)
        self.config_yaml = dump_config(cfg)
        self.stream = ShardStream(cfg.data.train)
        self.ctx = StepContext(cfg=cfg, optimizer=self.optimizer, scheduler=self.scheduler, device=self.device,
                               world_size=self.world_size, augment=make_augment(cfg),
                               input_eps=self.model.input_eps, stop=self.stop, build_model=self._model_copy,
                               engine_config=self.engine_config)
        run_id = None
        seed_everything(cfg.train.seed + 1000 * (self.rank + 1))  # dropout/masks differ per rank
        if metadata is not None:
            run_id = self._restore(resume, metadata, universal)
        mode = step_mode_name(cfg)
        get_step_mode(mode, cfg)
        set_up_step_mode(mode, self.engine, self.ctx, resume if metadata is not None else None)
        self.tracker = Tracker(cfg.tracking, active=self.rank == 0)
        self.run_id = self.tracker.start(run_id, to_dict(cfg)) or run_id
        self.last_checkpoint: Path | None = resume
        self.last_saved_step = self.progress.step if resume is not None else -1
        self.last_save_time = time.monotonic()
        self.history: list[dict[str, float]] = []

    def _build_model(self, metadata: dict[str, Any] | None) -> tuple[torch.nn.Module, PosttrainConfig]:
        """The model to train and the config resolved for it (a new validated copy, never ``self.cfg``
        changed in place); here the config as given. Under ZeRO-3 it is built in its partitions."""
        from posttrain.models.detector import build_detector

        zero3 = deepspeed_config(self.cfg, device_type=self.device.type) if builds_in_partitions(self.cfg) else None
        return build_detector(self.cfg.model, ssl_config=metadata["ssl_config"] if metadata else None,
                              layerdrop_conflicts=layerdrop_conflicts(self.cfg),
                              layerdrop_seed=self.cfg.train.seed, zero3=zero3), self.cfg

    def _build_engine(self, load_universal: bool) -> Any:
        import deepspeed

        self.engine_config = deepspeed_config(self.cfg, load_universal=load_universal, device_type=self.device.type)
        engine, *_ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=self.engine_config)
        return engine

    def _model_copy(self, initial: bool) -> torch.nn.Module:
        """``StepContext.build_model``: the run's initial model (``_build_model`` again, from the same seed), or
        (not ``initial``) the architecture only, built in partitions as the engine's model; the RNG streams
        of training are left as they were."""
        from posttrain.models.detector import build_detector

        with rng_preserved():
            seed_everything(self.cfg.train.seed)
            if initial:
                return self._build_model(None)[0]
            zero3 = self.engine_config if builds_in_partitions(self.cfg) else None
            return build_detector(self.cfg.model, ssl_config=self.model.ssl_config.to_dict(), zero3=zero3)

    def _restore(self, tag_dir: Path, metadata: dict[str, Any], universal: bool) -> str | None:
        ckpt.restore_engine(self.engine, tag_dir, universal=universal)
        self.scheduler.load_state_dict(metadata["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.stream.load_state_dict(metadata["loader"])
        self.progress = Progress(**metadata["progress"])
        self.ctx.state = dict(metadata.get("step_state", {}))
        if not ckpt.load_rng(tag_dir, self.rank):
            log.warning("%s: no RNG state for rank %d (saved at world size %d); keeping fresh seeds",
                        tag_dir, self.rank, metadata["world_size"])
        log.info("resumed from %s at step %d (epoch %d)", tag_dir, self.progress.step, self.progress.epoch)
        return metadata.get("mlflow_run_id")

    # -- persistence
    def _metadata(self, loader_state: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        return {"config": to_dict(cfg), "preset": cfg.model.preset,
                "ssl_config": json.loads(self.model.ssl_config.to_json_string(use_diff=False)),
                "loader": loader_state, "scheduler": self.scheduler.state_dict(),
                "step_state": self.ctx.state, "mlflow_run_id": self.run_id, "progress": asdict(self.progress),
                "world_size": self.world_size, "zero_stage": cfg.train.zero_stage,
                "precision": cfg.train.precision, "step_mode": step_mode_name(cfg), "saved_unix_s": time.time()}

    def save(self, *, best: bool = False) -> Path:
        """Collective checkpoint of the current state."""
        tag = ckpt.tag_for_step(self.progress.step)
        if (self.root / tag).exists():  # the epoch ended right after a save at this step: keep that one intact
            tag = f"{tag}-epoch{self.progress.epoch}"
        if best:
            self.progress.best_tag = tag
        started = time.monotonic()
        loader_state = self.stream.global_state_dict()  # collective
        tag_dir = ckpt.save_checkpoint(self.engine, self.root, tag, self._metadata(loader_state), self.config_yaml,
                                       self.cfg.checkpoint.keep_last, best=best,
                                       companions=list(self.ctx.companions.values()))
        self.last_checkpoint, self.last_saved_step = tag_dir, self.progress.step
        self.last_save_time = time.monotonic()
        # what a stop on the scheduler's warning must fit in: `posttrain plan --checkpoint-seconds` sizes it
        write_seconds = self.last_save_time - started
        log.info("checkpoint %s written in %.1f s", tag_dir, write_seconds)
        self.tracker.log_metrics({"checkpoint/step": self.progress.step, "checkpoint/write_seconds": write_seconds},
                                 self.progress.step)
        return tag_dir

    def _checkpoint_due(self) -> bool:
        every_steps, every_minutes = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_minutes
        due = bool(every_steps) and self.progress.step % every_steps == 0
        if every_minutes:  # rank 0's clock decides for everyone, so all enter the save together
            elapsed = time.monotonic() - self.last_save_time >= every_minutes * 60
            due = broadcast_flag(elapsed, collective_device()) or due
        return due

    # -- validation
    def run_validation(self) -> bool:
        """Validate; True when the EER improved on the best so far (then the caller saves as best)."""
        if not self.cfg.data.valid.shards:
            return False
        value, count = evaluate_validation(self.engine, self.cfg, self.device)
        self.progress.last_valid_eer = value
        improved = self.progress.best_valid_eer is None or value < self.progress.best_valid_eer
        if improved:
            self.progress.best_valid_eer = value
        self.tracker.log_metrics({"valid/eer": value, "valid/samples": count,
                                  "valid/best_eer": self.progress.best_valid_eer}, self.progress.step)
        return improved

    # -- loop
    def _after_step(self, stats: StepStats, meter: _Meter, bar: Any) -> None:
        progress = self.progress
        progress.step += 1
        progress.samples += stats.samples
        progress.audio_seconds += stats.audio_seconds
        meter.add(stats)
        if stats.skipped:
            progress.skipped_steps += 1
            progress.consecutive_skips += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        progress.step, progress.consecutive_skips)
            if progress.consecutive_skips >= self.cfg.train.max_consecutive_skips:
                raise NonFiniteTrainingError(
                    f"{progress.consecutive_skips} consecutive non-finite steps (train.max_consecutive_skips="
                    f"{self.cfg.train.max_consecutive_skips}) at step {progress.step}, epoch {progress.epoch}: "
                    f"check the learning rate, precision and data; last checkpoint: {self.last_checkpoint}")
        else:
            progress.consecutive_skips = 0
        bar.update(1)
        if stats.extra:  # a step mode's own diagnostics (SAM loss increase, dual-path cosine) are per step
            self.tracker.log_metrics({f"train/{key}": value for key, value in stats.extra.items()}, progress.step)
        if progress.step % self.cfg.train.log_every_steps == 0:
            metrics = meter.metrics(stats, progress)
            self.history.append({"step": progress.step, **metrics})
            self.tracker.log_metrics(metrics, progress.step)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{stats.lr:.2e}", epoch=progress.epoch)
            meter.reset()

    def _run_epoch(self, step_fn: Any, meter: _Meter, bar: Any) -> bool:
        """Train until the epoch ends (True), or ``max_steps`` is reached or the ranks agreed to stop on
        the scheduler's signal (False)."""
        cfg, progress = self.cfg, self.progress
        self.stream.set_epoch(progress.epoch)
        self.ctx.epoch = progress.epoch
        for micro_batches in micro_batch_groups(iter(self.stream), cfg.train.grad_accum_steps):
            self.ctx.step = progress.step
            stats = step_fn(self.engine, micro_batches, self.ctx)
            self._after_step(stats, meter, bar)
            if stats.stop_requested and progress.step < cfg.train.max_steps:  # agreed in the step's all_reduce
                self._stop_on_signal()
                return False
            improved = bool(cfg.train.valid_every_steps) and progress.step % cfg.train.valid_every_steps == 0 \
                and self.run_validation()
            if improved or self._checkpoint_due():
                self.save(best=improved)
            if progress.step >= cfg.train.max_steps:
                return False
        return True

    def _stop_agreed(self) -> bool:
        """Whether any rank got the stop signal (one all_reduce; within a step it rides on the step's)."""
        return all_reduce_sum([float(self.stop.requested)], collective_device())[0] > 0

    def _stop_on_signal(self) -> None:
        """The collective checkpoint (unless this step's is written), then (rank 0) ``stopped.json``
        naming it: only a complete checkpoint is announced, so a requeue never resumes from less."""
        tag_dir = self.save() if self.last_saved_step != self.progress.step else self.last_checkpoint
        received = self.stop.received_after_step
        agreed = all_gather_objects(received)  # which rank saw it first (None: not this one)
        self.stopped = SignalStop(signal=str(self.cfg.checkpoint.stop_signal),
                                  received_after_step=min(step for step in agreed if step is not None),
                                  stopped_after_step=self.progress.step, checkpoint=tag_dir.name)
        if self.rank == 0:
            write_stopped(self.output_dir, self.stopped)
        log.warning("%s received after step %d: checkpoint %s written at step %d, stopping for the requeue",
                    self.stopped.signal, self.stopped.received_after_step, tag_dir, self.progress.step)

    def fit(self) -> TrainResult:
        from tqdm import tqdm

        cfg, progress = self.cfg, self.progress
        self.stopped = None
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clear_stopped(self.output_dir)  # a previous stop is this run's resume point, not its outcome
            write_text_atomic(self.output_dir / "config.yaml", self.config_yaml)
            self.tracker.log_artifact(self.output_dir / "config.yaml")
            for directory in cfg.data.train.shards + cfg.data.valid.shards:
                self.tracker.log_artifact(Path(directory) / "index.json", f"shards/{Path(directory).name}")
        step_fn = get_step_mode(step_mode_name(cfg), cfg)
        meter = _Meter()
        bar = tqdm(total=cfg.train.max_steps, initial=progress.step, disable=self.rank != 0, desc="train",
                   unit="step", dynamic_ncols=True)
        status = "FAILED"
        try:
            while progress.step < cfg.train.max_steps and progress.epoch < cfg.train.max_epochs:
                epoch_start = progress.step
                if not self._run_epoch(step_fn, meter, bar):
                    break
                progress.epoch += 1
                # the run ends at whichever limit comes first: the bar's total follows max_epochs once an
                # epoch's length is known, so a run ended by it does not read as stopped at 46 %
                epochs_left = cfg.train.max_epochs - progress.epoch
                bar.total = min(cfg.train.max_steps, progress.step + (progress.step - epoch_start) * epochs_left)
                bar.refresh()
                self.stream.set_epoch(progress.epoch)  # the checkpoint then resumes at the next epoch
                improved = self.run_validation()
                self.save(best=improved)
                # it came during the epoch's last step, its validation or save (the last epoch just ends)
                if progress.epoch < cfg.train.max_epochs and progress.step < cfg.train.max_steps \
                        and self._stop_agreed():
                    self._stop_on_signal()
                    break
            if self.last_saved_step != progress.step:
                self.save(best=False)
            status = "KILLED" if self.stopped else "FINISHED"  # MLflow's word for a run stopped from outside
        finally:
            bar.close()
            self.tracker.finish(status)
            self.release()
        return TrainResult(progress=progress, output_dir=self.output_dir, last_checkpoint=self.last_checkpoint,
                           mlflow_run_id=self.run_id, history=self.history, stopped=self.stopped)


def train(cfg: PosttrainConfig) -> TrainResult:
    """Post-train a detector as ``cfg`` says; resumes from ``checkpoint.resume`` (``auto``: the
    output directory's ``latest``). Call on every rank (torchrun, SLURM or a plain ``python``)."""
    return Trainer(cfg).fit()
