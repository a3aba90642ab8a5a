"""Where in a file the fake is: the score of every window of a scored file, and the regions called fake.

A timeline is built from one ``SampleOutput`` of the windowed scorer (``posttrain.eval.inference``:
the same windows, window and hop in seconds, that gave the file its score). Each window row holds its
``[start_s, end_s)``, its ``logit_diff`` score, P(real), the LLR when a calibration is known and the
decision at the file decision's threshold (``posttrain.eval.scoring.Decision``). The regions called
fake are the union of the windows decided fake, overlapping or touching windows merged. The file
score stays the aggregated one (what ``posttrain metrics`` reads); the timeline only explains it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.calibration import Calibration
from posttrain.eval.scoring import Decision, logit_diff, p_real

WINDOW_FIELDS = ("start_s", "end_s", "logit_diff", "p_real", "llr", "decision")


@dataclass(frozen=True)
class WindowScore:
    start_s: float
    end_s: float
    logit_diff: float
    p_real: float
    llr: float | None
    decision: str  # "real" | "fake", at the file decision's threshold


@dataclass(frozen=True)
class Timeline:
    file: str
    seconds: float
    threshold_logit_diff: float
    windows: list[WindowScore]

    @property
    def fake_regions(self) -> list[tuple[float, float]]:
        """``[start_s, end_s)`` spans covered by windows decided fake, overlapping/touching ones merged."""
        regions: list[list[float]] = []
        for window in self.windows:
            if window.decision != "fake":
                continue
            if regions and window.start_s <= regions[-1][1]:
                regions[-1][1] = max(regions[-1][1], window.end_s)
            else:
                regions.append([window.start_s, window.end_s])
        return [(start, stop) for start, stop in regions]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "seconds": self.seconds, "threshold_logit_diff": self.threshold_logit_diff,
                "fake_regions": [list(region) for region in self.fake_regions],
                "windows": [asdict(window) for window in self.windows]}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=WINDOW_FIELDS, lineterminator="\n")
        writer.writeheader()
        for window in self.windows:
            writer.writerow({**asdict(window), "llr": "" if window.llr is None else window.llr})
        return out.getvalue()


def timeline_of(output: Any, decision: Decision, calibration: Calibration | None) -> Timeline:
    """The timeline of one scored file (``output``: a ``SampleOutput`` carrying its window outputs)."""
    if output.window_logits is None:
        raise ValueError(f"{output.id}: no window outputs (scored without windows?)")
    scores = logit_diff(output.window_logits)
    probabilities = p_real(output.window_logits)
    llrs = [None] * len(scores) if calibration is None else [float(v) for v in calibration.llr(scores)]
    windows = [WindowScore(start / SAMPLE_RATE_HZ, stop / SAMPLE_RATE_HZ, float(score), float(prob), llr,
                           decision.label(float(score)))
               for (start, stop), score, prob, llr in zip(output.window_spans, scores, probabilities, llrs)]
    return Timeline(str(output.id), output.seconds, decision.threshold, windows)


def plot_timeline(timeline: Timeline, path: str | Path) -> Path:
    """A PNG: window scores over time (a step per window at its centre), the decision threshold, and
    the regions called fake shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 3), dpi=100)
    try:
        for start, stop in timeline.fake_regions:
            axes.axvspan(start, stop, color="tab:red", alpha=0.2, lw=0)
        for window in timeline.windows:
            colour = "tab:red" if window.decision == "fake" else "tab:blue"
            axes.hlines(window.logit_diff, window.start_s, window.end_s, colors=colour, lw=2)
        centres = np.array([(w.start_s + w.end_s) / 2 for w in timeline.windows])
        axes.plot(centres, [w.logit_diff for w in timeline.windows], "k.", ms=4)
        axes.axhline(timeline.threshold_logit_diff, color="k", ls="--", lw=1,
                     label=f"threshold {timeline.threshold_logit_diff:+.3g}")
        axes.set_xlim(0, max(timeline.seconds, 1e-3))
        axes.set_xlabel("time (s)")
        axes.set_ylabel("logit_diff (higher = real)")
        axes.set_title(f"{Path(timeline.file).name}: shaded = called fake", fontsize=9)
        axes.legend(loc="upper right", fontsize=8)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


def write_timeline(timeline: Timeline, directory: str | Path, stem: str) -> dict[str, Path]:
    """``stem.timeline.csv``, ``stem.timeline.json`` and ``stem.timeline.png`` in ``directory``."""
    from posttrain.data.files import write_bytes_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / f"{stem}.timeline.csv", "json": directory / f"{stem}.timeline.json",
             "png": directory / f"{stem}.timeline.png"}
    write_bytes_atomic(paths["csv"], timeline.to_csv().encode("utf-8"))
    write_bytes_atomic(paths["json"], (json.dumps(timeline.to_dict(), indent=2) + "\n").encode("utf-8"))
    plot_timeline(timeline, paths["png"])
    return paths
