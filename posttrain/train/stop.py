"""Stop with a checkpoint when the scheduler warns (a time limit or a preemption ahead).

SLURM sends ``--signal=B:USR1@N`` to the batch shell, whose trap forwards it to every rank of the job
step. A rank only records it here (a signal handler must not start a collective: the other ranks would
not join). The step's one all_reduce (``finish_step``) then carries the flag, so every rank learns of a
signal that reached any of them in the same step, writes the same collective checkpoint and stops.
The stop is reported in ``<output_dir>/stopped.json`` (written after the checkpoint is complete), which
tells the batch shell to requeue the job; a run that ends on its own removes a stale one.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from posttrain.data.files import write_text_atomic

STOPPED_FILE = "stopped.json"


@dataclass
class SignalStop:
    """Where a stop came from and where it ended, as ``stopped.json`` records it."""

    signal: str
    received_after_step: int  # optimiser steps done on the rank that first saw the signal
    stopped_after_step: int  # the step of the checkpoint written for it (the resume point)
    checkpoint: str


class StopRequest:
    """Records ``signal_name`` (e.g. SIGUSR1) between ``install()`` and ``restore()``; ``steps_done``
    is read when it arrives, to report how far the run had got."""

    def __init__(self, signal_name: str | None, steps_done: Callable[[], int]):
        self.signal_name = signal_name
        self.steps_done = steps_done
        self.received_after_step: int | None = None
        self._previous: Any = None

    @property
    def requested(self) -> bool:
        return self.received_after_step is not None

    def install(self) -> "StopRequest":
        if self.signal_name is not None:
            self._previous = signal.signal(signal.Signals[self.signal_name], self._record)
        return self

    def restore(self) -> Any:
        """Put back the handler found at ``install()`` and return it (submitit's, to requeue through)."""
        previous, self._previous = self._previous, None
        if self.signal_name is not None and previous is not None:
            signal.signal(signal.Signals[self.signal_name], previous)
        return previous

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received_after_step is None:  # a repeated warning changes nothing
            self.received_after_step = self.steps_done()


def stopped_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / STOPPED_FILE


def write_stopped(output_dir: str | Path, stop: SignalStop) -> None:
    write_text_atomic(stopped_path(output_dir), json.dumps(asdict(stop), indent=1) + "\n")


def clear_stopped(output_dir: str | Path) -> None:
    stopped_path(output_dir).unlink(missing_ok=True)
