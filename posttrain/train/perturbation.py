"""Which engines have their weights perturbed right now: the guard between perturbing step modes and checkpoints.

A step mode that moves the weights away from ``w`` inside one step (SAM/ASAM/LookSAM today, ESAM or
any other ascent later) marks the engine with ``mark_perturbed`` before it perturbs and calls
``clear_perturbed`` once the weights are restored. Code that must only ever see ``w`` (checkpoint
writing, validation) calls ``assert_not_perturbed``. The mark stays up when a step raised between
its passes: the replicas may then be inconsistent and nothing may be saved from them.

This module knows no step mode, so checkpoint code and every perturbing mode can import it.
"""

from __future__ import annotations

import weakref
from typing import Any

_perturbed_by: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()  # engine -> step mode


class PerturbedWeightsError(RuntimeError):
    """The engine's weights are perturbed by a step mode: nothing may be saved or evaluated now."""


def mark_perturbed(engine: Any, mode: str) -> None:
    """``mode`` (e.g. ``"sam"``) is about to move ``engine``'s weights away from ``w``."""
    _perturbed_by[engine] = mode


def clear_perturbed(engine: Any) -> None:
    """``engine``'s weights are ``w`` again (every rank restored them)."""
    _perturbed_by.pop(engine, None)


def assert_not_perturbed(engine: Any, action: str = "checkpoint") -> None:
    """Raise when ``engine`` is between the passes of a perturbing step (or one failed mid-step)."""
    mode = _perturbed_by.get(engine)
    if mode is not None:
        raise PerturbedWeightsError(f"{mode}: cannot {action}: the weights are perturbed (inside a {mode} step, or "
                                    "one failed between its passes and the model replicas may be inconsistent)")
