"""AntiDeepfake's encoder regularisation that transformers lacks or draws differently.

- **Feature-gradient scaling** (fairseq ``feature_grad_mult``; AntiDeepfake's wav2vec 2.0 small uses
  0.1): the gradient flowing back from the transformer into the conv feature extractor is multiplied
  by the factor; the forward pass is unchanged. transformers has no such setting: a forward hook on
  the feature extractor applies it (no parameter, so state dicts and exports are unchanged).
- **LayerDrop drawn alike on every rank.** transformers draws each layer's LayerDrop from the global
  CPU generator, which posttrain seeds per rank; ranks would then skip different layers and hand
  ZeRO's gradient reduction different parameter sets. ``SyncedLayerDrop`` re-seeds the CPU generator
  for each training forward from (seed, number of training forwards so far), the same on every rank
  since every rank runs the same number of forwards per step (join batches included). The caller's
  generator state is restored afterwards. On CPU, dropout masks come from that generator too and are
  then alike across ranks (on GPU they come from the CUDA generator, untouched).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


class GradMultiply(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def install_feature_grad_mult(encoder: nn.Module, scale: float) -> torch.utils.hooks.RemovableHandle | None:
    """Scale the gradient into ``encoder.feature_extractor`` by ``scale`` (None: 1.0 needs no hook)."""
    if scale == 1.0:
        return None
    return encoder.feature_extractor.register_forward_hook(
        lambda module, inputs, output: GradMultiply.apply(output, scale))


class SyncedLayerDrop:
    """Seeds transformers' LayerDrop draws alike on every rank (see the module docstring)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.forwards = 0

    @contextlib.contextmanager
    def draws(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + self.forwards)
            self.forwards += 1
            yield
