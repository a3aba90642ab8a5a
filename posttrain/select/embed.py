"""Pooled (penultimate) embeddings of every sample of a source (a shard set, an audio folder, a protocol),
for data selection and drift, into the folder ``posttrain.select.embeddings`` describes. A sample longer
than the scoring window is embedded as the length-weighted mean of its window embeddings
(``posttrain.eval.scoring``; a linear head of that mean is the sample's mean logits; not so a one-class head).

Ranks write their rows into their own part file (``np.lib.format.open_memmap``, a row per sample of their
tasks, in the order samples complete), streaming; rank 0 then copies the parts into ``embeddings.npy``
in the source's order, in bounded chunks. Part files rather than one shared memmap: writes to one file from
several nodes through page caches are not coherent on network filesystems. Every final file is
written under a temporary name and renamed; the manifest goes last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from posttrain.data.files import write_bytes_atomic
from posttrain.dist import DistInfo, dist_info
from posttrain.eval.inference import Skipped, Source, gather, iter_outputs, rank_inputs, rank_tasks
from posttrain.eval.onnx_runtime import OnnxModel
from posttrain.eval.scoring import InferenceConfig, logit_columns
from posttrain.models.detector import Detector
from posttrain.select.embeddings import (DTYPES, EMBEDDINGS_NAME, MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION,
                                         META_FIELDS, META_NAME, PARTS_NAME)

COPY_ROWS = 65_536  # rows moved per step of the merge (bounds its memory)


def _row_meta(output, local_row: int) -> dict[str, Any]:
    meta = {field: output.meta.get(field, "-") for field in META_FIELDS}
    return {"id": output.id, **meta, "shard": output.meta.get("shard"), "seconds": output.seconds,
            "num_windows": output.num_windows, **logit_columns(output.logits), "_local_row": local_row}


def embed_source(model: Detector | OnnxModel, source: Source, out_dir: str | Path, cfg: InferenceConfig, *,
                 model_identity: Mapping[str, Any], device: torch.device | str = "cpu", dtype: str = "float32",
                 info: DistInfo | None = None) -> dict[str, Any] | None:
    """Embed every sample of ``source`` into ``out_dir``; returns the manifest on rank 0, None elsewhere."""
    cfg.validate()
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {DTYPES}")
    info = info or dist_info()
    out_dir = Path(out_dir)
    tasks = rank_tasks(source.tasks(), info)
    dim = int(model.ssl_config.hidden_size)
    part_path = out_dir / PARTS_NAME / f"rank-{info.rank:05d}.npy"
    part_path.parent.mkdir(parents=True, exist_ok=True)
    part = np.lib.format.open_memmap(part_path, mode="w+", dtype=dtype, shape=(sum(t.count for t in tasks), dim))
    rows, skipped = [], []
    for item in iter_outputs(model, rank_inputs(source, cfg, info), cfg, device=device, embeddings=True):
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        part[len(rows)] = item.embedding  # in completion order: the merge puts rows in source order
        rows.append((item.position, info.rank, _row_meta(item, len(rows))))
    part.flush()
    del part
    # gather returns on rank 0 only once every rank has sent, i.e. after every part is flushed
    rows, skipped = gather(rows, info), gather(skipped, info)
    if rows is None or skipped is None:
        return None
    rows.sort(key=lambda entry: entry[0])
    skipped.sort(key=lambda item: item.position)
    _merge_parts(out_dir, rows, dim, dtype, info.world_size)
    lines = []
    for row, (_, _, meta) in enumerate(rows):
        meta.pop("_local_row")
        lines.append(json.dumps({"row": row, **meta}))
    write_bytes_atomic(out_dir / META_NAME, ("\n".join(lines) + "\n" if lines else "").encode("utf-8"))
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "dim": dim, "count": len(rows),
                "dtype": dtype, "embedding": "mean over valid frames of the encoder's last layer (the head's input)",
                "index_samples": source.count, "skipped": {"count": len(skipped),
                                                           "items": [item.to_dict() for item in skipped]},
                "model": dict(model_identity), "data": source.identity(), "inference": cfg.describe(),
                "world_size": info.world_size}
    write_bytes_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2, default=str) + "\n").encode("utf-8"))
    shutil.rmtree(out_dir / PARTS_NAME, ignore_errors=True)
    return manifest


def _merge_parts(out_dir: Path, rows: list[tuple[int, int, dict]], dim: int, dtype: str, world_size: int) -> None:
    """Copy the rows of every rank's part file into ``embeddings.npy`` in position order."""
    parts = [np.load(out_dir / PARTS_NAME / f"rank-{rank:05d}.npy", mmap_mode="r") for rank in range(world_size)]
    staging = out_dir / f".{EMBEDDINGS_NAME}.tmp"
    final = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=(len(rows), dim))
    ranks = np.array([rank for _, rank, _ in rows], dtype=np.int64)
    local = np.array([meta["_local_row"] for _, _, meta in rows], dtype=np.int64)
    for start in range(0, len(rows), COPY_ROWS):
        stop = min(start + COPY_ROWS, len(rows))
        block = np.empty((stop - start, dim), dtype=dtype)
        for rank, part in enumerate(parts):
            chosen = ranks[start:stop] == rank
            if chosen.any():
                block[chosen] = part[local[start:stop][chosen]]
        final[start:stop] = block
    final.flush()
    del final
    os.replace(staging, out_dir / EMBEDDINGS_NAME)
