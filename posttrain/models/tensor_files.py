"""Weights files read one tensor at a time: names and shapes up front, data only when asked for.

A model built in ZeRO-3 partitions (``posttrain.models.partitioned``) is filled module by module from
rank 0, so nothing here ever holds a whole state dict:

- **safetensors**: the header gives every name and shape; each read opens the file, copies one
  tensor out and closes it again, so the pages it touched leave the reader's RSS with the mapping;
- **torch pickles** (``.bin``/``.ckpt``/...): ``torch.load(mmap=True, weights_only=True)``: tensors
  backed by the file, paged in as they are copied (a legacy non-zip pickle cannot be mapped and is
  read whole, as before). ``weights_only`` refuses any pickle that needs more than tensors.

A transformers model folder holds one file or several shards listed by an index (``*.index.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

# a transformers folder's weights, in the order from_pretrained prefers them
FOLDER_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")
# the meta-device dtype of each safetensors dtype name (shapes are what callers need before reading)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_meta(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a meta tensor (name, shape, dtype; no data read).
    Raises ``safetensors.SafetensorError`` for a truncated or corrupt file, as reading it whole does."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:  # checks the header covers the file
        return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta",
                                 dtype=_SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32))
                for key in handle.keys()}


def read_safetensor(path: str | Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file (the file is mapped only while it is copied out)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(key)


def mapped_pickle(path: str | Path) -> object:
    """A torch pickle loaded with ``weights_only=True``, its tensors backed by the file where it is a
    zip archive (``mmap=True``); a legacy pickle (torch < 1.6's format) is read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "zipfile" not in str(error):  # torch: "mmap can only be used with files saved with ... zipfile ..."
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def file_readers(path: str | Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> reader of every tensor of one weights file (safetensors or a torch pickle)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return {key: _safetensor_reader(path, key) for key in safetensors_meta(path)}
    state = mapped_pickle(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (names -> tensors), got {type(state).__name__}")
    return {key: _constant(tensor) for key, tensor in state.items() if isinstance(tensor, torch.Tensor)}


def folder_weights(folder: str | Path) -> Path | None:
    """The weights file (or shard index) of a transformers model folder, None when it has none."""
    return next((Path(folder) / name for name in FOLDER_WEIGHT_FILES if (Path(folder) / name).is_file()), None)


def folder_readers(folder: str | Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> reader of every tensor of a transformers model folder (one file, or the shards its index lists)."""
    weights = folder_weights(folder)
    if weights is None:
        raise FileNotFoundError(f"{folder}: no weights ({' or '.join(FOLDER_WEIGHT_FILES)})")
    if not weights.name.endswith(".index.json"):
        return file_readers(weights)
    shards = sorted(set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values()))
    readers: dict[str, Callable[[], torch.Tensor]] = {}
    for shard in shards:
        readers.update(file_readers(weights.parent / shard))
    return readers


def _safetensor_reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    return lambda: read_safetensor(path, key)


def _constant(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor
