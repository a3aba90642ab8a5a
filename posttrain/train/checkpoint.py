"""Collective, atomic training checkpoints and their offline use.

Layout under ``<output_dir>/checkpoints/``::

    latest                 text file: the tag of the newest *complete* checkpoint (temp + os.replace)
    best                   text file: the tag with the best validation EER (same discipline)
    step-00001000/         one DeepSpeed tag folder (engine.save_checkpoint(..., save_latest=False))
        mp_rank_00_model_states.pt, *_optim_states.pt      DeepSpeed's own files
        rng/rank-00000.pt  per-rank RNG states, tensors only (torch.load(weights_only=True))
        config.yaml        the resolved config
        posttrain.json     metadata, written last: its presence marks the tag complete
    universal/step-00001000/   a DeepSpeed universal conversion, made on demand for a resume at
                               another world size

``posttrain.json`` holds the resolved config, the merged loader state of all ranks, the MLflow run
id, the progress counters, the scheduler state, the step mode's state, the world size, and the
transformers ``ssl_config`` plus preset, so the detector can be rebuilt offline.

A checkpoint is written by every rank, then a barrier, then rank 0 writes ``posttrain.json`` and
only then moves ``latest``; a crash at any point leaves ``latest`` on the previous complete tag.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from posttrain import console
from posttrain.config import ModelConfig
from posttrain.data.files import write_text_atomic
from posttrain.dist import barrier, process_rank
from posttrain.errors import UserError
from posttrain.train.perturbation import assert_not_perturbed
from posttrain.train.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from posttrain.models.detector import Detector

METADATA_FILE = "posttrain.json"
METADATA_FORMAT = "posttrain-checkpoint"
METADATA_VERSION = 1
LATEST = "latest"
BEST = "best"
# "-epochN" marks an epoch-end save at a step that already has a mid-epoch checkpoint
TAG_PATTERN = re.compile(r"^step-(\d{8,})(-epoch\d+)?$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that cannot be used as given (incomplete, foreign, unreadable)."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def tag_for_step(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------------ small files


def read_pointer(root: Path, name: str = LATEST) -> str | None:
    """The tag a pointer file names, or None when there is none."""
    path = Path(root) / name
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def write_pointer(root: Path, tag: str, name: str = LATEST) -> None:
    """Point ``name`` at ``tag``; refuses a tag that is not complete (no ``posttrain.json``)."""
    if not is_complete(Path(root) / tag):
        raise CheckpointError(f"{Path(root) / tag}: not a complete checkpoint ({METADATA_FILE} missing); "
                              f"refusing to point {name} at it")
    write_text_atomic(Path(root) / name, tag + "\n")


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / METADATA_FILE).is_file()


def list_tags(root: Path) -> list[str]:
    """Complete tags under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda tag: (int(TAG_PATTERN.match(tag).group(1)), tag))


def prune(root: Path, keep_last: int) -> list[str]:
    """Delete complete tags beyond the newest ``keep_last``, never the ones ``latest`` or ``best``
    point at; also delete incomplete tag folders older than ``latest`` (left by a crash). Returns
    the deleted tags."""
    root = Path(root)
    protected = {read_pointer(root, LATEST), read_pointer(root, BEST)}
    complete = list_tags(root)
    doomed = [tag for tag in complete[:-keep_last] if tag not in protected] if keep_last else []
    latest = read_pointer(root, LATEST)
    if latest and TAG_PATTERN.match(latest):
        latest_step = int(TAG_PATTERN.match(latest).group(1))
        doomed += [p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)
                   and not is_complete(p) and int(TAG_PATTERN.match(p.name).group(1)) < latest_step]
    for tag in doomed:
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / "universal" / tag, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------ RNG


def rng_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / "rng" / f"rank-{rank:05d}.pt"


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's saved RNG states; False when the checkpoint has none for ``rank``
    (a resume at a larger world size)."""
    path = rng_path(tag_dir, rank)
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


# --------------------------------------------------------------------------------------- save/load


def save_checkpoint(engine: "DeepSpeedEngine", root: Path, tag: str, metadata: dict[str, Any],
                    config_yaml: str, keep_last: int, *, best: bool = False, companions: list[Any] = ()) -> Path:
    """Collective: every rank calls it. Returns the tag folder. ``companions``: what a step mode keeps
    beside the engine (``StepContext.companions``), each written by its ``save(tag_dir)`` (collective)
    before the checkpoint is marked complete."""
    assert_not_perturbed(engine, "write a checkpoint")  # never between a perturbing step's two passes
    root = Path(root)
    tag_dir = root / tag
    rank = process_rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    rng_file = rng_path(tag_dir, rank)
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = rng_file.with_name(rng_file.name + ".tmp")
    torch.save(rng_state(), tmp)
    os.replace(tmp, rng_file)
    for companion in companions:
        companion.save(tag_dir)
    barrier()  # every rank has finished its DeepSpeed files, RNG state and the step mode's files
    if rank == 0:
        write_text_atomic(tag_dir / "config.yaml", config_yaml)
        record = {"format": METADATA_FORMAT, "version": METADATA_VERSION, "tag": tag, **metadata}
        write_text_atomic(tag_dir / METADATA_FILE, json.dumps(record, indent=1, sort_keys=True))
        write_pointer(root, tag, LATEST)
        if best:
            write_pointer(root, tag, BEST)
        prune(root, keep_last)
    barrier()  # nobody reads or prunes while rank 0 is still moving pointers
    return tag_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A tag folder from a tag folder, or from a checkpoints root holding ``latest``."""
    path = Path(path)
    if is_complete(path):
        return path
    tag = read_pointer(path, LATEST)
    if tag is not None and is_complete(path / tag):
        return path / tag
    if path.is_dir() and (path / "checkpoints").is_dir():
        return resolve_checkpoint(path / "checkpoints")
    raise CheckpointError(f"{path}: not a complete checkpoint (no {METADATA_FILE}) and no '{LATEST}' "
                          f"pointing at one")


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``checkpoint.resume``: ``auto`` -> <output_dir>/checkpoints/latest when present, ``none``,
    or an explicit tag folder / checkpoints root."""
    if resume == "none":
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
        return resolve_checkpoint(root) if read_pointer(root, LATEST) else None
    return resolve_checkpoint(resume)


def read_metadata(tag_dir: str | Path) -> dict[str, Any]:
    path = Path(tag_dir) / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({error})") from None
    if metadata.get("format") != METADATA_FORMAT or metadata.get("version") != METADATA_VERSION:
        raise CheckpointError(f"{path}: expected {METADATA_FORMAT} v{METADATA_VERSION}, got "
                              f"{metadata.get('format')!r} v{metadata.get('version')!r}")
    return metadata


def universal_dir(tag_dir: Path) -> Path:
    tag_dir = Path(tag_dir)
    return tag_dir.parent / "universal" / tag_dir.name


def convert_to_universal(tag_dir: Path) -> Path:
    """Collective: rank 0 converts ``tag_dir`` with DeepSpeed's ``ds_to_universal`` (once; the result
    is kept next to it), the others wait. Returns the universal tag folder."""
    target = universal_dir(tag_dir)
    if process_rank() == 0 and not (target / ".complete").is_file():
        staging = target.with_name(target.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                   "--output_folder", str(staging), "--inject_missing_state", "--num_extract_workers", "1",
                   "--num_merge_workers", "1"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(f"{tag_dir}: universal conversion failed ({' '.join(command)}):\n"
                                  f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
        (staging / ".complete").write_text("")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    barrier()
    return target


def restore_engine(engine: "DeepSpeedEngine", tag_dir: Path, *, universal: bool) -> None:
    """Load model and optimiser state into ``engine`` (collective). ``universal`` loads the
    conversion made by ``convert_to_universal`` (the engine must have ``checkpoint.load_universal``)."""
    source = universal_dir(tag_dir) if universal else Path(tag_dir)
    path, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"{source}: DeepSpeed could not load this checkpoint")


# ------------------------------------------------------------------------------------------- offline


def consolidate_fp32(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The detector's full fp32 state dict (keys as ``Detector.state_dict()``) and the checkpoint's
    ``posttrain.json`` metadata, from a tag folder or a checkpoints root (its ``latest``).

    DeepSpeed's files are pickles: use this on checkpoints you trust (your own training runs)."""
    tag_dir = resolve_checkpoint(path)
    metadata = read_metadata(tag_dir)
    state = _zero_to_fp32(tag_dir, lazy=False)
    return {key: value.float().contiguous() for key, value in state.items()}, metadata


def open_checkpoint(path: str | Path) -> tuple[dict[str, Any], Callable[[], dict[str, Callable[[], torch.Tensor]]]]:
    """``consolidate_fp32`` without consolidating: ``(metadata, open_readers)``, ``open_readers()`` a
    reader of each fp32 tensor (DeepSpeed's lazy consolidation: the optimiser files are mapped, each
    tensor assembled from its partitions when read), for ``posttrain.models.partitioned.load_into_partitions``.
    Only for checkpoints you trust, as ``consolidate_fp32``."""
    tag_dir = resolve_checkpoint(path)
    metadata = read_metadata(tag_dir)

    def open_readers() -> dict[str, Callable[[], torch.Tensor]]:
        state = _zero_to_fp32(tag_dir, lazy=True)
        return {key: functools.partial(_assembled, value) for key, value in state.items()}

    return metadata, open_readers


def _assembled(value: Any) -> torch.Tensor:
    return value.contiguous().float()  # a lazy GatheredTensor, or a plain tensor (buffers)


def _zero_to_fp32(tag_dir: Path, *, lazy: bool) -> dict[str, Any]:
    """DeepSpeed's fp32 consolidation of ``tag_dir``, its reports kept off stdout: zero_to_fp32 prints a
    progress report on every load ("Processing zero checkpoint ...") and a "Loading checkpoint shards" bar,
    which would mix with the results of eval/score/publish (and stay off the console unless --verbose)."""
    from unittest import mock

    from deepspeed.utils import zero_to_fp32
    from tqdm import tqdm

    bar = functools.partial(tqdm, disable=console.current() != console.VERBOSE)
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(zero_to_fp32, "tqdm", bar):
        return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                                     lazy_mode=lazy)


def model_config_from_metadata(metadata: dict[str, Any]) -> ModelConfig:
    """The model section of the saved config, for inference: no hub download, no recompute."""
    from posttrain.config import from_dict

    model = from_dict(ModelConfig, dict(metadata["config"]["model"]), "model")
    model.pretrained = None
    model.gradient_checkpointing = False
    return model


def load_detector_from_checkpoint(path: str | Path) -> tuple["Detector", dict[str, Any]]:
    """Rebuild the detector offline (saved ``ssl_config``) with the checkpoint's fp32 weights, in
    eval mode; returns it with the metadata."""
    from posttrain.models.detector import build_detector

    state, metadata = consolidate_fp32(path)
    detector = build_detector(model_config_from_metadata(metadata), ssl_config=metadata["ssl_config"])
    detector.load_state_dict(state, strict=True)
    return detector.eval(), metadata
