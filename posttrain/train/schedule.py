"""The AntiDeepfake learning-rate schedule as a ``torch.optim.lr_scheduler.LambdaLR``.

Optimiser step ``s`` (0-based: the step about to be taken) uses ``lr * factor(s)``:

- warm-up, ``s < W``: ``(s + 1) / W`` (linear, reaching the peak on the last warm-up step rather
  than wasting the first step at lr 0);
- decay, ``W <= s < D``: ``r ** ((s - W) / (D - W))`` (exponential from 1 to ``r``);
- after, ``s >= D``: ``r`` (held);

with ``W = warmup_steps``, ``D = decay_end_steps`` and ``r = final_lr_ratio``.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from posttrain.config import ScheduleConfig


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate at 0-based optimiser step ``step``."""
    warmup, decay_end, ratio = cfg.warmup_steps, cfg.decay_end_steps, cfg.final_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if step >= decay_end:
        return ratio
    return ratio ** ((step - warmup) / (decay_end - warmup))


def build_scheduler(optimizer: Optimizer, cfg: ScheduleConfig) -> LambdaLR:
    """A ``LambdaLR`` applying ``lr_factor``; call its ``step()`` once per *applied* optimiser step
    (skipped non-finite steps do not advance the schedule)."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
