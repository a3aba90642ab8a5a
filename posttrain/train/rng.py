"""Capture and restore every random generator a training step draws from (Python, NumPy, torch CPU and CUDA).

Used by checkpoints (per-rank states saved beside DeepSpeed's files, so a resume continues the same
draws) and by perturbing step modes (SAM's second pass repeats the first pass's dropout/SpecAugment
draws). The state is tensors only, so ``torch.load(weights_only=True)`` reads it back.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def rng_state() -> dict[str, torch.Tensor]:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors only."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, 0 if gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    version, has_gauss = state["python_meta"].tolist()
    gauss = float(state["python_gauss"][0]) if has_gauss else None
    random.setstate((version, tuple(state["python_words"].tolist()), gauss))
    pos, np_has_gauss = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, np_has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Every generator ``rng_state`` covers is as it was after the block, whatever the block seeds or draws
    (``torch.random.fork_rng`` keeps torch's only, not Python's or NumPy's)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
