"""Batched inference of a detector over a shard set, a protocol CSV or audio files: the one core
under ``posttrain eval``, ``score`` and ``embed``.

Flow
    A *source* lists its work as tasks (a shard, a run of protocol rows, a file) and decodes a task to
    16 kHz mono samples, each with its *position* in the source's fixed order (index order for shards,
    row order for a protocol, sorted path order for files). Unreadable input becomes a ``Skipped``
    record (id, reason, detail) and the rest goes on. Samples are cut into windows
    (``posttrain.eval.scoring``); windows of all files are grouped by ``posttrain.data.batching`` into
    batches bounded by padded audio seconds, in duration buckets so similar lengths share a batch
    (little padding) while only a few partial buckets are ever held: memory stays bounded on any
    number of hour-long files. Each batch is normalised per window as the model was trained
    (``Detector.normalise``: AntiDeepfake's eps for its releases), run in eval mode under
    ``torch.inference_mode`` (bf16 autocast optional on GPU), and the window outputs of a sample are
    aggregated once its last window is back. Padding never changes a result: the
    detector masks it.

Ranks
    Under torchrun (several ranks) each rank takes a disjoint share of the tasks, balanced by seconds
    (bytes for plain files) with ``posttrain.data.read_order.balance``; ``gather`` brings outputs and
    skips to rank 0, which orders them by position, so the result does not depend on the world size.
    Inside a rank, DataLoader workers (``num_workers``) decode tasks in parallel.

Backends (``InferenceConfig.backend``)
    ``torch``: a ``Detector`` as above. ``onnxruntime``: an ONNX export (``posttrain.eval.onnx_runtime``) on the
    CPU; the same windows and batches go in raw (its graph normalises and masks), logits and the pooled
    embedding come out, so scores and embeddings agree with the torch backend's within float rounding (an
    export made before the graph had an ``embedding`` output gives logits only: ``embedding_unavailable``).

Scoring modes (``InferenceConfig.mode``; every report says which one produced it)
    ``windowed`` (default): long files in windows, windows of many files batched as above.
    ``antideepfake``: AntiDeepfake's test protocol, every file whole (no window, no crop) and alone
    (batch 1), so a converted AntiDeepfake checkpoint gives the scores AntiDeepfake's own evaluation
    gives. Memory grows with the longest file. In both modes the waveform is normalised the way
    the model was trained (AntiDeepfake's eps for AntiDeepfake-derived models).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.data.batch import Batch
from posttrain.data.batching import batch_by_seconds, bucket_edges
from posttrain.data.protocol import read_protocol, row_to_dict
from posttrain.data.shards import SampleError, decode_sample, file_sha256, iter_shard, load_index, shard_paths
from posttrain.data.read_order import balance
from posttrain.dist import DistInfo, dist_info
from posttrain.errors import UserError
from posttrain.eval.onnx_runtime import OnnxModel
from posttrain.eval.scoring import InferenceConfig, aggregate
from posttrain.models.detector import Detector

ROWS_PER_TASK = 64  # protocol rows decoded by one task: enough to amortise a worker hand-off
WHOLE_FILE_BUCKET_SECONDS = 30.0  # bucket range when files are scored whole (no window bound)


# ---------------------------------------------------------------------------------------- records


@dataclass
class Sample:
    position: int  # in the source's fixed order
    id: str
    wave: np.ndarray  # 16 kHz mono float32
    meta: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    position: int
    id: str
    reason: str  # one word (AudioError.REASONS, or "corrupt" for a broken shard sample)
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


@dataclass
class SampleOutput:
    position: int
    id: str
    meta: dict[str, Any]
    logits: np.ndarray  # [2] float64, [fake, real], aggregated over windows
    embedding: np.ndarray | None  # [D], aggregated like the logits; only when asked for
    num_windows: int
    num_samples: int
    # the windows behind ``logits``: ``[start, stop)`` sample spans and their own [W, 2] logits, in
    # window order (what a timeline plots; ``posttrain.eval.timeline``)
    window_spans: tuple[tuple[int, int], ...] = ()
    window_logits: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE_HZ


@dataclass(frozen=True)
class Task:
    weight: float  # for balancing ranks (seconds, or bytes for plain files)
    count: int  # samples (or skips) the task produces
    payload: Any


# ---------------------------------------------------------------------------------------- sources


class ShardSource:
    """Every sample of a shard set, in index order; one task per shard."""

    kind = "shards"

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = load_index(self.directory)
        self.count = sum(entry["samples"] for entry in self.index["shards"])

    def tasks(self) -> list[Task]:
        tasks, offset = [], 0
        for entry, path in zip(self.index["shards"], shard_paths(self.directory, self.index)):
            tasks.append(Task(float(entry["seconds"]), int(entry["samples"]),
                              (entry["name"], str(path), offset, tuple(entry["keys"]))))
            offset += int(entry["samples"])
        return tasks

    def read(self, task: Task) -> Iterator[Sample | Skipped]:
        name, path, offset, keys = task.payload
        positions = {key: offset + i for i, key in enumerate(keys)}
        seen: set[str] = set()
        try:
            for key, files in iter_shard(path):
                if key not in positions:
                    warnings.warn(f"{path}: key {key!r} is not in the index; not scored (run shards verify)")
                    continue
                seen.add(key)
                yield _decode_shard_sample(positions[key], key, files, name)
        except Exception as error:  # a truncated or unreadable tar: what it lost is counted below
            detail = f"{name}: unreadable tar: {error}"
        else:
            detail = f"{name}: in the index but not in the tar"
        for key in keys:
            if key not in seen:
                yield Skipped(positions[key], key, "missing", detail)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "directory": str(self.directory.resolve()),
                "index_sha256": file_sha256(self.directory / "index.json"), "samples": self.count,
                "shards": len(self.index["shards"])}


def _decode_shard_sample(position: int, key: str, files: dict[str, bytes], shard: str) -> Sample | Skipped:
    try:
        decoded = decode_sample(key, files)
    except SampleError as error:  # this sample is corrupt, the shard goes on
        return Skipped(position, error.sample_id or key, "corrupt", f"{shard}: {error.detail}")
    return _checked(Sample(position, decoded.id, decoded.wave, {**decoded.meta, "shard": shard}))


def _checked(sample: Sample) -> Sample | Skipped:
    try:
        audio.check(sample.wave, SAMPLE_RATE_HZ, 0.0, sample.id)
    except audio.AudioError as error:
        return Skipped(sample.position, sample.id, error.reason, error.detail)
    return sample


class ProtocolSource:
    """Every row of a protocol CSV (``$ROOT`` paths under ``root``), decoded from its audio file."""

    kind = "protocol"

    def __init__(self, protocol: str | Path, root: str | Path | None, *,
                 max_file_seconds: float = audio.DEFAULT_MAX_FILE_SECONDS):
        self.protocol, self.root, self.max_file_seconds = Path(protocol), root, max_file_seconds
        self.rows = read_protocol(self.protocol)
        self.count = len(self.rows)

    def tasks(self) -> list[Task]:
        return [Task(sum(row.duration_s for row in self.rows[start:start + ROWS_PER_TASK]),
                     len(self.rows[start:start + ROWS_PER_TASK]), start)
                for start in range(0, len(self.rows), ROWS_PER_TASK)]

    def read(self, task: Task) -> Iterator[Sample | Skipped]:
        for position in range(task.payload, task.payload + task.count):
            row = self.rows[position]
            try:
                path = row.resolved_path(self.root)
            except ValueError as error:
                yield Skipped(position, row.id, "unreadable", str(error))
                continue
            yield _load_file(position, row.id, path, row_to_dict(row), self.max_file_seconds)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "protocol": str(self.protocol.resolve()),
                "protocol_sha256": file_sha256(self.protocol), "root": None if self.root is None else str(self.root),
                "rows": self.count}


def _load_file(position: int, sample_id: str, path: Path, meta: dict[str, Any],
               max_file_seconds: float) -> Sample | Skipped:
    try:
        waveform = audio.load(path, sample_rate_hz=SAMPLE_RATE_HZ, max_seconds=max_file_seconds)
    except audio.AudioError as error:
        return Skipped(position, sample_id, error.reason, error.detail)
    except Exception as error:  # a decoder crash on a hostile file is that file's problem only
        return Skipped(position, sample_id, "unreadable", f"{path}: {error!r}")
    return Sample(position, sample_id, waveform.samples, {**meta, "path": str(path),
                                                          "orig_sample_rate_hz": waveform.orig_sample_rate_hz,
                                                          "level_dbfs": audio.level_dbfs(waveform.samples),
                                                          "warnings": list(waveform.warnings)})


class FileSource:
    """Audio files named on the command line (``audio.audio_inputs``: folders searched recursively).
    A file's id is its path as found; files keep the order given, folder contents sorted by path."""

    kind = "files"

    def __init__(self, paths: Iterable[str | Path], *, max_file_seconds: float = audio.DEFAULT_MAX_FILE_SECONDS):
        self.max_file_seconds = max_file_seconds
        self.paths = audio.audio_inputs(paths)  # a missing file becomes a per-file error, not an abort
        self.count = len(self.paths)

    def tasks(self) -> list[Task]:
        return [Task(float(path.stat().st_size) if path.is_file() else 0.0, 1, position)
                for position, path in enumerate(self.paths)]

    def read(self, task: Task) -> Iterator[Sample | Skipped]:
        path = self.paths[task.payload]
        yield _load_file(task.payload, str(path), path, {}, self.max_file_seconds)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "files": self.count}


Source = ShardSource | ProtocolSource | FileSource


def rank_tasks(tasks: list[Task], info: DistInfo) -> list[Task]:
    """This rank's disjoint share of ``tasks``, balanced by weight (every task goes to one rank)."""
    return [tasks[i] for i in balance([task.weight for task in tasks], info.world_size)[info.rank]]


class _Decoder(IterableDataset):
    """Decodes a rank's tasks; DataLoader workers take every ``num_workers``-th task."""

    def __init__(self, source: Source, tasks: list[Task]):
        super().__init__()
        self.source, self.tasks = source, tasks

    def __iter__(self) -> Iterator[Sample | Skipped]:
        worker = get_worker_info()
        tasks = self.tasks if worker is None else self.tasks[worker.id::worker.num_workers]
        for task in tasks:
            yield from self.source.read(task)


def decoded_inputs(source: Source, tasks: list[Task], num_workers: int) -> Iterable[Sample | Skipped]:
    decoder = _Decoder(source, tasks)
    if num_workers == 0:
        return decoder
    return DataLoader(decoder, batch_size=None, num_workers=num_workers, collate_fn=_as_is)


def _as_is(item: Sample | Skipped) -> Sample | Skipped:
    return item


# -------------------------------------------------------------------------------------- the core


@dataclass
class WindowMeter:
    """Windows cut from decoded audio but not yet through the model: ``peak`` is the most at once."""

    live: int = 0
    peak: int = 0
    total: int = 0

    def cut(self) -> None:
        self.live += 1
        self.total += 1
        self.peak = max(self.peak, self.live)

    def release(self, count: int) -> None:
        self.live -= count


@dataclass
class _Window:
    position: int
    index: int  # window number inside its sample
    wave: np.ndarray


class _Pending:
    """A sample whose windows are in flight; outputs are stored per window and aggregated in window
    order, so the result does not depend on which batch each window landed in."""

    def __init__(self, sample: Sample, spans: list[tuple[int, int]]):
        self.sample, self.spans = sample, spans
        self.logits: list[np.ndarray | None] = [None] * len(spans)
        self.embeddings: list[np.ndarray | None] = [None] * len(spans)
        self.missing = len(spans)

    def add(self, index: int, logits: np.ndarray, embedding: np.ndarray | None) -> bool:
        self.logits[index], self.embeddings[index] = logits, embedding
        self.missing -= 1
        return self.missing == 0

    def output(self, rule: str) -> SampleOutput:
        lengths = np.array([stop - start for start, stop in self.spans])
        embeddings = None if self.embeddings[0] is None else np.stack(self.embeddings)
        window_logits = np.stack(self.logits).astype(np.float64)
        logits, embedding = aggregate(lengths, window_logits, embeddings, rule)
        sample = self.sample
        return SampleOutput(sample.position, sample.id, sample.meta, logits,
                            None if embedding is None else embedding.astype(np.float32),
                            len(self.spans), len(sample.wave), tuple(self.spans), window_logits)


def min_input_samples(model: Detector) -> int:
    """The shortest input giving the encoder one frame (its convolutional receptive field)."""
    config = model.ssl_config
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need


def embedding_unavailable(model: Detector | OnnxModel) -> str | None:
    """Why ``model`` gives no pooled embedding (one line with the fix: an ONNX export made before the graph
    had that output), else None."""
    if isinstance(model, OnnxModel) and not model.has_embedding:
        return model.no_embedding_reason
    return None


@torch.inference_mode()
def forward_windows(model: Detector | OnnxModel, waves: list[np.ndarray], device: torch.device,
                    precision: str = "fp32") -> tuple[np.ndarray, np.ndarray | None]:
    """``(logits [B, 2], pooled [B, D])`` float32 of windows, each normalised on its own (with the
    model's normalisation: a model is scored as it was trained). An ONNX model (the onnxruntime backend)
    normalises inside its graph, on the CPU in fp32 whatever ``device`` and ``precision`` say (its config
    refuses others); its pooled output is None where the export has none (``embedding_unavailable``)."""
    if isinstance(model, OnnxModel):
        return model.outputs(waves)
    batch = Batch.collate([torch.from_numpy(np.ascontiguousarray(w)) for w in waves], [0] * len(waves),
                          [], []).to(device)
    inputs = model.normalise(batch.waveforms, batch.lengths)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
        precision == "bf16" and device.type == "cuda") else contextlib.nullcontext()
    with autocast:
        pooled = model.embed(inputs, batch.lengths)
        logits = model.head(pooled)
    return logits.float().cpu().numpy(), pooled.float().cpu().numpy()


def iter_outputs(model: Detector | OnnxModel, inputs: Iterable[Sample | Skipped], cfg: InferenceConfig, *,
                 device: torch.device | str = "cpu", embeddings: bool = False,
                 meter: WindowMeter | None = None) -> Iterator[SampleOutput | Skipped]:
    """Each input's output (or its ``Skipped``), yielded as soon as its last window is scored;
    not in input order (a sample's windows may wait in a bucket)."""
    if embeddings and (missing := embedding_unavailable(model)):
        raise UserError(missing)
    device, meter = torch.device(device), meter or WindowMeter()
    model.eval()
    min_samples = min_input_samples(model)
    pending: dict[int, _Pending] = {}
    skipped: list[Skipped] = []

    def windows() -> Iterator[_Window]:
        for item in inputs:
            if isinstance(item, Sample) and len(item.wave) < min_samples:
                item = Skipped(item.position, item.id, "too_short",
                               f"{len(item.wave)} samples; the model needs at least {min_samples}")
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            spans = cfg.window.spans(len(item.wave))
            pending[item.position] = _Pending(item, spans)
            for index, (start, stop) in enumerate(spans):
                meter.cut()
                yield _Window(item.position, index, item.wave[start:stop])

    edges = bucket_edges(cfg.num_buckets, cfg.window.window_seconds or WHOLE_FILE_BUCKET_SECONDS)
    for group in batch_by_seconds(windows(), lambda window: len(window.wave), sample_rate_hz=SAMPLE_RATE_HZ,
                                  max_batch_seconds=cfg.batch_seconds, max_batch_size=cfg.max_batch_size,
                                  edges_seconds=edges):
        logits, pooled = forward_windows(model, [window.wave for window in group], device, cfg.precision)
        meter.release(len(group))
        for row, window in enumerate(group):
            state = pending[window.position]
            if state.add(window.index, logits[row], pooled[row] if embeddings else None):
                del pending[window.position]
                yield state.output(cfg.aggregation)
        yield from skipped
        skipped.clear()
    yield from skipped


# ------------------------------------------------------------------------------------ ranks, runs


def gather(objects: list[Any], info: DistInfo) -> list[Any] | None:
    """Concatenate every rank's list on rank 0 (None elsewhere); one process: the list itself."""
    if info.world_size == 1 or not torch_dist.is_initialized():
        return objects
    parts: list[list[Any]] | None = [None] * info.world_size if info.is_main else None  # type: ignore[list-item]
    torch_dist.gather_object(objects, parts, dst=0)
    return None if parts is None else [item for part in parts for item in part]


def rank_inputs(source: Source, cfg: InferenceConfig, info: DistInfo) -> Iterator[Sample | Skipped]:
    """This rank's decoded inputs, with a progress bar on rank 0 (its own share, in files)."""
    tasks = rank_tasks(source.tasks(), info)
    inputs = decoded_inputs(source, tasks, cfg.num_workers)
    return iter(tqdm(inputs, total=sum(task.count for task in tasks), unit="file", desc=source.kind,
                     disable=not (cfg.progress and info.is_main), dynamic_ncols=True))


@dataclass
class InferenceResult:
    outputs: list[SampleOutput]  # in source order
    skipped: list[Skipped]  # in source order
    windows: int  # windows scored on this rank

    @property
    def seconds(self) -> float:
        return sum(output.seconds for output in self.outputs)


def run_inference(model: Detector | OnnxModel, source: Source, cfg: InferenceConfig, *, device: torch.device | str = "cpu",
                  info: DistInfo | None = None) -> InferenceResult | None:
    """Logits of every sample of ``source`` (no embeddings); gathered and ordered on rank 0, None on
    other ranks. Every sample appears exactly once, in ``outputs`` or in ``skipped``."""
    cfg.validate()
    info = info or dist_info()
    meter = WindowMeter()
    outputs, skipped = [], []
    for item in iter_outputs(model, rank_inputs(source, cfg, info), cfg, device=device, meter=meter):
        (skipped if isinstance(item, Skipped) else outputs).append(item)
    outputs, skipped = gather(outputs, info), gather(skipped, info)
    if outputs is None or skipped is None:
        return None
    return InferenceResult(sorted(outputs, key=lambda o: o.position), sorted(skipped, key=lambda s: s.position),
                           meter.total)
