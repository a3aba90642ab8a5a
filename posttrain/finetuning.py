"""Fine-tuning on Deepfake-Eval-2024 under ``accelerate launch``, then per-segment and per-file tests.

``finetune(cfg)`` runs the post-training loop of ``posttrain.train.trainer`` unchanged (step modes,
checkpoints, MLflow, validation) with three differences:

- the weights start from ``finetune.init_from``, any ``posttrain.loading.load_model`` spec (a posttrain checkpoint, a
  transformers export, a converted AntiDeepfake release, a hub id), rebuilt with this run's training
  settings (no LayerDrop, dropout, SpecAugment, activation checkpointing); under ZeRO-3 the model is built
  in its partitions and the weights are read into them one module at a time (``train.partitioned_init``);
- the DeepSpeed engine comes from ``accelerator.prepare(model, optimizer, scheduler)``: accelerate's
  config (its ``deepspeed_config_file`` or ``zero_stage``/offload flags) decides the ZeRO stage and
  offload, posttrain's config what the step logic depends on (micro-batch 1, accumulation steps,
  clipping, precision; see ``plugin_deepspeed_config``). The loader is NOT prepared: ``ShardStream``
  splits shards by rank and worker itself (a prepared IterableDataset would be read by rank 0 and
  broadcast). Step modes call the engine's own ``backward``/``step``: ``accelerator.backward`` would
  step the engine a second time;
- once training ends, every rank loads the final checkpoint, or with ``finetune.test_checkpoint: best``
  the one with the lowest validation EER (AntiDeepfake's choice), consolidated fp32, and scores each
  test set with ``posttrain.eval``:
  a report per segment length (``<output_dir>/eval/<name>/segments/``) and one per source file
  (``.../files/``), the file's output being the aggregation (``finetune.file_aggregation``) of its
  segments' outputs, weighted by segment length. EERs go to the run's MLflow record.
"""

from __future__ import annotations

import csv
import gc
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as torch_dist

from posttrain.config import ConfigError, FinetuneConfig, layerdrop_conflicts, resolved, to_dict
from posttrain.errors import UserError
from posttrain.train.checkpoint import BEST, CheckpointError, checkpoint_root, read_pointer
from posttrain.dist import choose_device, start_process_group
from posttrain.train.trainer import Trainer, TrainResult
from posttrain.train.engine_config import (builds_in_partitions, checked_deepspeed_config, deepspeed_config,
                                        merge_dicts)
from posttrain.train.tracking import Tracker

if TYPE_CHECKING:
    from accelerate import Accelerator

    from posttrain.eval.inference import SampleOutput
    from posttrain.models.score_definitions import ScoreDefinition
    from posttrain.models.detector import Detector

log = logging.getLogger(__name__)

# (spec, device, *, preset, build) -> (Detector in eval mode, identity): ``posttrain.loading.load_model``
ModelLoader = Callable[..., tuple["Detector", dict[str, Any]]]
# ``posttrain.data.df2024`` names segment k of file F cut at N seconds "<F>-<N>s-<k>"
SEGMENT_ID = re.compile(r"^(?P<file_id>.+)-(?P<seconds>\d+)s-(?P<index>\d+)$")
# DeepSpeed keys the step modes rely on: always posttrain's values, whatever accelerate's config says
STEP_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
             "zero_allow_untested_optimizer", "steps_per_print", "wall_clock_breakdown", "checkpoint")


# ------------------------------------------------------------------------------------------ config


def resolve_data(cfg: FinetuneConfig) -> FinetuneConfig:
    """Fill the training shards and test sets from ``finetune.df2024_dir`` where the config leaves them
    empty (see ``FinetuneSection``); a named shard folder that is missing raises ``ConfigError``."""
    section = cfg.finetune
    root = Path(section.df2024_dir) if section.df2024_dir else None
    filled: dict[str, Any] = {}
    if not cfg.data.train.shards:
        if root is None:
            raise ConfigError("data.train.shards", "empty, and no finetune.df2024_dir to take them from")
        filled["data.train.shards"] = [str(root / "shards" / f"{section.train_segment_seconds}s" / "train")]
    if not section.test_sets and root is not None:
        filled["finetune.test_sets"] = [
            {"name": f"{n}s", "shards": str(root / "shards" / f"{n}s" / "test"),
             "segments_csv": str(root / f"{n}s" / "segments.csv")}
            for n in section.eval_segment_seconds if (root / "shards" / f"{n}s" / "test" / "index.json").is_file()]
    cfg = resolved(cfg, filled)
    section = cfg.finetune
    for i, directory in enumerate(cfg.data.train.shards):
        if not (Path(directory) / "index.json").is_file():
            raise ConfigError(f"data.train.shards[{i}]", f"{directory}: no index.json (run `posttrain data df2024 "
                                                         f"... --shards` first)")
    for i, test in enumerate(section.test_sets):
        if not (Path(test.shards) / "index.json").is_file():
            raise ConfigError(f"finetune.test_sets[{i}].shards", f"{test.shards}: no index.json")
    return cfg


def plugin_deepspeed_config(plugin_config: dict[str, Any], cfg: FinetuneConfig, *,
                            load_universal: bool = False) -> dict[str, Any]:
    """accelerate's DeepSpeed config completed by posttrain's (``trainer.deepspeed_config``).

    accelerate keeps the ZeRO section (stage, offload, buckets) and any other explicit key of its
    config file; ``STEP_KEYS`` are always posttrain's (the loss scaling and skip logic assume them);
    ``auto`` values become posttrain's; ``train.deepspeed_overrides`` are merged last."""
    cfg = with_plugin_stage(cfg, plugin_config)
    ours = deepspeed_config(cfg, load_universal=load_universal)
    theirs = _without_auto({key: value for key, value in plugin_config.items()
                            if key not in STEP_KEYS and key != "train_batch_size"})
    # DeepSpeed derives train_batch_size from micro-batch x accumulation x world size
    return checked_deepspeed_config(merge_dicts(merge_dicts(ours, theirs), cfg.train.deepspeed_overrides), cfg,
                                    "accelerate's DeepSpeed config or train.deepspeed_overrides")


def with_plugin_stage(cfg: FinetuneConfig, plugin_config: dict[str, Any]) -> FinetuneConfig:
    """``cfg`` resolved to the ZeRO stage accelerate's config chose, so checkpoints record the truth."""
    stage = plugin_config.get("zero_optimization", {}).get("stage", cfg.train.zero_stage)
    if stage not in (1, 2, 3):
        raise ConfigError("zero_optimization.stage", f"the accelerate DeepSpeed config asks for ZeRO stage {stage}; "
                                                     "posttrain needs 1, 2 or 3 (its skip logic relies on ZeRO)")
    return resolved(cfg, {"train.zero_stage": stage})


def _without_auto(config: dict[str, Any]) -> dict[str, Any]:
    cleaned = {}
    for key, value in config.items():
        if isinstance(value, dict):
            cleaned[key] = _without_auto(value)
        elif value != "auto":
            cleaned[key] = value
    return cleaned


def make_accelerator(cfg: FinetuneConfig) -> "Accelerator":
    """The process group (posttrain's ``start_process_group``: gloo on CPU without the shared-memory
    kernel build) and an ``Accelerator`` with a DeepSpeed plugin: under ``accelerate launch
    --use_deepspeed`` the plugin reads accelerate's config; a plain ``python finetune.py`` gets
    ``train.zero_stage``."""
    device = choose_device(cfg.train.device)
    start_process_group(device, deepspeed=True)
    from accelerate import Accelerator, DeepSpeedPlugin

    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if launched and ds_file and ds_file != "none" and not Path(ds_file).is_file():
        raise UserError(f"{ds_file}: no such DeepSpeed config (named by deepspeed_config_file in the accelerate "
                        "config); fix that path, or drop it and set zero_stage there as "
                        "configs/accelerate/deepspeed_zero2.yaml does")
    if not launched:  # plain python, or an accelerate config without DeepSpeed: posttrain's own settings
        log.info("no DeepSpeed config from accelerate: ZeRO stage %d from train.zero_stage", cfg.train.zero_stage)
    plugin = DeepSpeedPlugin(zero_stage=None if launched else cfg.train.zero_stage)
    # no cpu=True on CPU: accelerate would then drop the DeepSpeed plugin (DS_ACCELERATOR=cpu picks the device)
    return Accelerator(mixed_precision="no" if cfg.train.precision == "fp32" else cfg.train.precision,
                       deepspeed_plugin=plugin)


# the model settings a loaded model decides, whatever the fine-tune config says (its head is its weights')
HEAD_KEYS = ("head", "oc_margin_real", "oc_margin_fake", "oc_scale")


def model_resolved(cfg: FinetuneConfig, preset: str | None, head: dict[str, Any]) -> FinetuneConfig:
    """``cfg`` with the loaded model's preset (when it names one) and head settings."""
    overrides = {"model.preset": preset or cfg.model.preset}
    overrides.update({f"model.{key}": value for key, value in head.items() if key in HEAD_KEYS})
    return resolved(cfg, overrides)


def initial_detector(cfg: FinetuneConfig, metadata: dict[str, Any] | None, load_model: "ModelLoader",
                     zero3: dict[str, Any] | None = None) -> tuple["Detector", FinetuneConfig]:
    """The detector to train and ``cfg`` resolved for it: from a resumed checkpoint's architecture (its
    weights come with the DeepSpeed state), else from ``finetune.init_from`` (read by ``load_model``),
    rebuilt under ``cfg.model``'s training settings. The model's identity wins over the config: its
    preset (when it names one) and its waveform normalisation (a model is trained as it was before).

    ``zero3`` (the DeepSpeed config of a ZeRO-3 run): built in its partitions, the ``init_from`` weights
    read into them module by module (never a full state dict per rank)."""
    from posttrain.models.detector import build_detector

    training = {"layerdrop_conflicts": layerdrop_conflicts(cfg), "layerdrop_seed": cfg.train.seed, "zero3": zero3}
    if metadata is not None:
        saved_model = (metadata.get("config") or {}).get("model") or {}
        cfg = model_resolved(cfg, metadata.get("preset"), {key: saved_model[key] for key in HEAD_KEYS if key in saved_model})
        return build_detector(cfg.model, ssl_config=metadata["ssl_config"], **training), cfg
    if zero3 is not None:
        built: dict[str, FinetuneConfig] = {}

        def build(ssl_config: dict[str, Any], identity: dict[str, Any]) -> "Detector":
            built["cfg"] = model_resolved(cfg, identity.get("preset"), identity.get("head") or {})
            return build_detector(built["cfg"].model, ssl_config=ssl_config, **training)

        detector, _ = load_model(cfg.finetune.init_from, preset=cfg.finetune.init_preset, build=build)
        return detector.train(), built["cfg"]
    loaded, identity = load_model(cfg.finetune.init_from, preset=cfg.finetune.init_preset)
    cfg = model_resolved(cfg, identity.get("preset"), loaded.head_settings)
    detector = build_detector(cfg.model, ssl_config=loaded.ssl_config.to_dict(), **training)
    detector.load_state_dict(loaded.state_dict(), strict=True)
    return detector.train(), cfg


# ------------------------------------------------------------------------------------------ training


class FinetuneTrainer(Trainer):
    """``Trainer`` with the model from ``finetune.init_from`` and the engine from ``accelerator.prepare``;
    the loop, step modes, validation and checkpoints are the engine's."""

    def __init__(self, cfg: FinetuneConfig, accelerator: "Accelerator", load_model: "ModelLoader"):
        self.accelerator = accelerator
        self.load_model = load_model
        cfg = with_plugin_stage(cfg, accelerator.state.deepspeed_plugin.deepspeed_config)
        # accelerate's process_index reads 0 on every rank under DS_ACCELERATOR=cpu: the engine asks torch
        super().__init__(cfg, device=accelerator.device)

    def _build_model(self, metadata: dict[str, Any] | None) -> tuple[torch.nn.Module, FinetuneConfig]:
        plugin_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        zero3 = plugin_deepspeed_config(plugin_config, self.cfg) if builds_in_partitions(self.cfg) else None
        return initial_detector(self.cfg, metadata, self.load_model, zero3=zero3)

    def _build_engine(self, load_universal: bool) -> Any:
        plugin_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        merged = plugin_deepspeed_config(plugin_config, self.cfg, load_universal=load_universal)
        plugin_config.clear()  # in place: accelerate's plugin keeps this very dict
        plugin_config.update(merged)
        self.engine_config = merged
        # the scheduler is not one DeepSpeed knows, so its engine never steps it: finish_step does
        engine, _, _ = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        return engine


# ------------------------------------------------------------------------------------------ testing


def read_segment_map(path: str | Path) -> dict[str, tuple[str, int]]:
    """``segment id -> (file id, segment index)`` from ``posttrain data df2024``'s segments.csv."""
    path = Path(path)
    mapping = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"segment_id", "file_id", "index"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {sorted(missing)}")
        for row in reader:
            try:
                mapping[row["segment_id"]] = (row["file_id"], int(row["index"]))
            except ValueError:
                raise ValueError(f"{path}:{reader.line_num}: bad segment index {row['index']!r}") from None
    return mapping


def file_of(segment_id: str, mapping: dict[str, tuple[str, int]] | None) -> tuple[str, int]:
    """(file id, segment index) of a segment: from the mapping when given, else from the id."""
    if mapping is not None:
        if segment_id not in mapping:
            raise ValueError(f"segment {segment_id!r} is not in the segment -> file mapping")
        return mapping[segment_id]
    match = SEGMENT_ID.match(segment_id)
    if match is None:
        raise ValueError(f"segment id {segment_id!r} does not read <file id>-<N>s-<k> and no segments.csv was given")
    return match["file_id"], int(match["index"])


def segment_records(outputs: list["SampleOutput"], definition: "ScoreDefinition") -> list[dict[str, Any]]:
    from posttrain.eval.scoring import score_record

    return [score_record(out.id, out.logits, out.meta, definition) for out in outputs]


def file_records(outputs: list["SampleOutput"], mapping: dict[str, tuple[str, int]] | None,
                 rule: str, definition: "ScoreDefinition") -> list[dict[str, Any]]:
    """One record per source file: its segments' logits aggregated (``scoring.aggregate``, weights =
    segment lengths, segments in index order). A file whose segments disagree on the label raises."""
    from posttrain.eval.scoring import aggregate, score_record

    files: dict[str, list[tuple[int, "SampleOutput"]]] = {}
    for out in outputs:
        file_id, index = file_of(out.id, mapping)
        files.setdefault(file_id, []).append((index, out))
    records = []
    for file_id, parts in files.items():
        parts.sort(key=lambda part: part[0])
        labels = {out.meta["label"] for _, out in parts}
        if len(labels) != 1:
            raise ValueError(f"file {file_id}: its segments carry different labels {sorted(labels)}")
        first = parts[0][1].meta
        logits, _ = aggregate(np.array([out.num_samples for _, out in parts]),
                              np.stack([out.logits for _, out in parts]), None, rule)
        records.append(score_record(file_id, logits, first, definition))  # every segment carries the file's label
    return records


@dataclass
class EvalOutcome:
    name: str
    segment_eer: float | None
    file_eer: float | None
    segments: int
    files: int
    skipped: int
    reports: dict[str, Path] = field(default_factory=dict)  # "segments" / "files" -> report folder


def evaluate_test_sets(cfg: FinetuneConfig, checkpoint: Path, device: torch.device,
                       load_model: "ModelLoader") -> list[EvalOutcome]:
    """Score every test set with ``checkpoint`` on all ranks; rank 0 writes the reports and returns
    the outcomes (other ranks: an empty list). Collective."""
    from posttrain.eval.inference import ShardSource, run_inference
    from posttrain.eval.scoring import InferenceConfig
    from posttrain.eval.report import SCORE_TYPES, write_report
    from posttrain.eval.scoring import WindowConfig

    section = cfg.finetune
    window = section.eval_window_seconds
    inference = InferenceConfig(window=WindowConfig(window, window), aggregation="mean_logits",
                                batch_seconds=section.eval_batch_seconds,
                                precision="bf16" if cfg.train.precision == "bf16" else "fp32", progress=False)
    model, identity = load_model(checkpoint, device)
    scoring = model.score_definition  # the head's: logit_diff, or the one-class head's cosine
    definition = SCORE_TYPES[scoring.name]
    outcomes = []
    for test in section.test_sets:
        source = ShardSource(test.shards)
        result = run_inference(model, source, inference, device=device)
        if result is None:  # not rank 0
            continue
        mapping = read_segment_map(test.segments_csv) if test.segments_csv and Path(test.segments_csv).is_file() \
            else None
        data = {**source.identity(), "scored": len(result.outputs), "skipped": len(result.skipped),
                "audio_seconds": result.seconds, "inference": inference.describe(),
                "segments_csv": test.segments_csv if mapping is not None else None}
        skipped = [item.to_dict() for item in result.skipped]
        out_dir = Path(cfg.output_dir) / "eval" / test.name
        reports, eers = {}, {}
        per_file = file_records(result.outputs, mapping, section.file_aggregation, scoring)
        for level, records in (("segments", segment_records(result.outputs, scoring)), ("files", per_file)):
            level_data = data if level == "segments" else {**data, "file_aggregation": section.file_aggregation}
            report = write_report(out_dir / level, records, score_definition=definition, model_identity=identity,
                                  data_identity=level_data, skipped=skipped, scoring=inference.summary())
            reports[level], eers[level] = out_dir / level, report["metrics"]["pooled"]["eer"]
        outcomes.append(EvalOutcome(test.name, eers["segments"], eers["files"], len(result.outputs), len(per_file),
                                    len(result.skipped), reports))
    return outcomes


def log_outcomes(cfg: FinetuneConfig, run_id: str | None, outcomes: list[EvalOutcome], step: int) -> None:
    """The test EERs (and report files) into the training run's MLflow record (rank 0)."""
    if not outcomes or run_id is None:
        return
    tracker = Tracker(cfg.tracking, active=True)
    tracker.start(run_id, to_dict(cfg))  # continues the run; its parameters are already there
    status = "FAILED"
    try:
        for outcome in outcomes:
            metrics = {f"test/{outcome.name}/{level}_eer": value
                       for level, value in (("segment", outcome.segment_eer), ("file", outcome.file_eer))
                       if value is not None}
            tracker.log_metrics({**metrics, f"test/{outcome.name}/segments": outcome.segments,
                                 f"test/{outcome.name}/files": outcome.files}, step)
            for level, folder in outcome.reports.items():
                for name in ("metrics.txt", "result.yaml"):
                    tracker.log_artifact(folder / name, f"eval/{outcome.name}/{level}")
        status = "FINISHED"
    finally:
        tracker.finish(status)


# ---------------------------------------------------------------------------------------- the entry


@dataclass
class FinetuneResult:
    train: TrainResult
    tests: list[EvalOutcome]  # rank 0 only (empty elsewhere)


def format_summary(result: FinetuneResult, cfg: FinetuneConfig) -> str:
    """What a user reads when fine-tuning ends: training counters, one row per test set (EER per
    segment and per file) and where the reports, checkpoints and MLflow run are."""
    progress = result.train.progress
    lines = [f"fine-tuned {progress.step} steps ({progress.samples} samples, {progress.skipped_steps} skipped), "
             f"epoch {progress.epoch}; checkpoint {result.train.last_checkpoint}"]
    if result.tests:
        width = max(len("test set"), *(len(outcome.name) for outcome in result.tests))
        lines.append(f"{'test set':<{width}}  {'segments':>8}  {'files':>6}  {'segment EER %':>13}  {'file EER %':>10}"
                     f"  {'skipped':>7}  reports (metrics.txt, metrics.json, det.png, result.yaml)")
        for outcome in result.tests:
            eers = ["n/a" if eer is None else f"{100 * eer:.3f}" for eer in (outcome.segment_eer, outcome.file_eer)]
            folders = " ".join(f"{folder}/" for folder in outcome.reports.values())
            lines.append(f"{outcome.name:<{width}}  {outcome.segments:>8}  {outcome.files:>6}  {eers[0]:>13}  "
                         f"{eers[1]:>10}  {outcome.skipped:>7}  {folders}")
    else:
        lines.append("no test set was scored (finetune.evaluate or finetune.test_sets)")
    if cfg.tracking.enabled:
        lines.append(f"MLflow: mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}")
    return "\n".join(lines)


def checkpoint_to_test(cfg: FinetuneConfig, result: TrainResult) -> Path:
    """The checkpoint the test sets are scored with: the last one, or the best-validated one."""
    if cfg.finetune.test_checkpoint == "final":
        return result.last_checkpoint
    root = checkpoint_root(cfg.output_dir)
    best = read_pointer(root, BEST)
    if best is None:
        raise CheckpointError(f"{root}: no '{BEST}' checkpoint (no validation ran): finetune.test_checkpoint: "
                              "best needs data.valid.shards and at least one validation (train.valid_every_steps "
                              "or an epoch end)")
    return root / best


def finetune(cfg: FinetuneConfig, load_model: "ModelLoader",
             accelerator: "Accelerator | None" = None) -> FinetuneResult:
    """Fine-tune as ``cfg`` says, then test (``finetune.evaluate``). Call on every rank. ``load_model``
    is the "any model spec" loader (``posttrain.loading.load_model``, which sits above this floor)."""
    cfg = resolve_data(cfg)
    accelerator = accelerator or make_accelerator(cfg)
    trainer = FinetuneTrainer(cfg, accelerator, load_model)
    result = trainer.fit()
    device, cfg = trainer.device, trainer.cfg  # the config as the run resolved and recorded it
    del trainer  # the engine's partitions and optimiser state go before the test model comes in
    accelerator.free_memory()
    gc.collect()
    tests: list[EvalOutcome] = []
    if cfg.finetune.evaluate and cfg.finetune.test_sets and result.last_checkpoint is not None:
        tests = evaluate_test_sets(cfg, checkpoint_to_test(cfg, result), device, load_model)
        if torch_dist.get_rank() == 0:
            log_outcomes(cfg, result.mlflow_run_id, tests, result.progress.step)
            for outcome in tests:
                log.info("test %s: segment EER %s, file EER %s (%d segments, %d files)", outcome.name,
                         outcome.segment_eer, outcome.file_eer, outcome.segments, outcome.files)
        torch_dist.barrier()
    return FinetuneResult(result, tests)
