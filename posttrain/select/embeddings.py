"""The embeddings folder ``posttrain embed`` writes, and reading it back (no torch: drift and selection
read embeddings on a machine without the training stack).

An embeddings folder holds
    ``embeddings.npy``   ``[count, dim]`` (float32 or float16): open with ``np.load(..., mmap_mode="r")``;
    ``meta.jsonl``       line ``i`` describes row ``i``: row, id, label, corpus, attack, language,
                         speaker, shard, seconds, num_windows, logit_fake, logit_real;
    ``embeddings.json``  the manifest: model identity, dim, count, dtype, the data identity (shard
                         index sha256), the inference settings and the skipped samples with reasons.
Rows follow the source's order (a shard set's index: shards in index order, keys in tar order; an audio
folder's sorted paths), skipped samples left out, so the layout does not depend on the world size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDINGS_NAME, META_NAME, MANIFEST_NAME = "embeddings.npy", "meta.jsonl", "embeddings.json"
PARTS_NAME = ".parts"
MANIFEST_FORMAT, MANIFEST_VERSION = "posttrain-embeddings", 1
DTYPES = ("float32", "float16")
META_FIELDS = ("label", "corpus", "attack", "language", "speaker")


class EmbeddingsError(ValueError):
    """An embeddings folder that is incomplete or inconsistent, naming the file."""


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of an embeddings folder (model identity, dim, count, data, inference settings)."""
    manifest_path = Path(directory) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise EmbeddingsError(f"{manifest_path}: missing (no finished `posttrain embed` run in this folder)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise EmbeddingsError(f"{manifest_path}: format/version: expected {MANIFEST_FORMAT!r} {MANIFEST_VERSION}")
    return manifest


def load_embeddings(directory: str | Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``(embeddings [count, dim] read-only memmap, per-row metadata)`` of an embeddings folder."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    array = np.load(directory / EMBEDDINGS_NAME, mmap_mode="r")
    if array.shape != (manifest["count"], manifest["dim"]) or str(array.dtype) != manifest["dtype"]:
        raise EmbeddingsError(f"{directory / EMBEDDINGS_NAME}: {array.shape} {array.dtype}, manifest says "
                              f"({manifest['count']}, {manifest['dim']}) {manifest['dtype']}")
    with (directory / META_NAME).open(encoding="utf-8") as handle:
        meta = [json.loads(line) for line in handle if line.strip()]
    if len(meta) != manifest["count"]:
        raise EmbeddingsError(f"{directory / META_NAME}: {len(meta)} rows, manifest says {manifest['count']}")
    return array, meta
