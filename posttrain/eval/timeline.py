"""Where in a file the fake is: the score of every window of a scored file, and the regions called fake.

A timeline is built from one ``SampleOutput`` of the windowed scorer (``posttrain.eval.inference``:
the same windows, window and hop in seconds, that gave the file its score). Each window row holds its
``[start_s, end_s)``, its score (the model's: ``logit_diff``, or ``cosine`` for the one-class head, written
under that name), P(real) (for a cosine only through a calibration, else empty), the LLR when a calibration
is known and the decision at the file decision's threshold (``posttrain.eval.scoring.Decision``). The regions called
fake are the union of the windows decided fake, overlapping or touching windows merged. The file
score stays the aggregated one (what ``posttrain metrics`` reads); the timeline only explains it.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.eval.calibration import Calibration
from posttrain.eval.scoring import Decision, p_real, threshold_key
from posttrain.models.score_definitions import LOGIT_DIFF, ScoreDefinition


def window_fields(score_name: str = LOGIT_DIFF.name) -> tuple[str, ...]:
    """The columns of a timeline CSV: the score under its name (``logit_diff``, ``cosine``)."""
    return ("start_s", "end_s", score_name, "p_real", "llr", "decision")


@dataclass(frozen=True)
class WindowScore:
    start_s: float
    end_s: float
    score: float  # the model's score (Timeline.score_name)
    p_real: float | None  # None: a score that is no logit, uncalibrated
    llr: float | None
    decision: str  # "real" | "fake", at the file decision's threshold

    def to_dict(self, score_name: str) -> dict[str, Any]:
        return {"start_s": self.start_s, "end_s": self.end_s, score_name: self.score, "p_real": self.p_real,
                "llr": self.llr, "decision": self.decision}


@dataclass(frozen=True)
class Timeline:
    file: str
    seconds: float
    threshold: float  # on the score, the file decision's
    windows: list[WindowScore]
    score_name: str = LOGIT_DIFF.name

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
        return {"file": self.file, "seconds": self.seconds, "score_definition": self.score_name,
                threshold_key(self.score_name): self.threshold,
                "fake_regions": [list(region) for region in self.fake_regions],
                "windows": [window.to_dict(self.score_name) for window in self.windows]}

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=window_fields(self.score_name), lineterminator="\n")
        writer.writeheader()
        for window in self.windows:
            row = window.to_dict(self.score_name)
            writer.writerow({**row, **{key: "" for key in ("p_real", "llr") if row[key] is None}})
        return out.getvalue()


def timeline_of(output: Any, decision: Decision, calibration: Calibration | None,
                definition: ScoreDefinition = LOGIT_DIFF) -> Timeline:
    """The timeline of one scored file (``output``: a ``SampleOutput`` carrying its window outputs), its
    scores as ``definition`` (the model's) says."""
    if output.window_logits is None:
        raise ValueError(f"{output.id}: no window outputs (scored without windows?)")
    scores = definition.scores(output.window_logits)
    probabilities = p_real(output.window_logits, definition, calibration)
    probabilities = [None] * len(scores) if probabilities is None else [float(p) for p in probabilities]
    llrs = [None] * len(scores) if calibration is None else [float(v) for v in calibration.llr(scores)]
    windows = [WindowScore(start / SAMPLE_RATE_HZ, stop / SAMPLE_RATE_HZ, float(score), prob, llr,
                           decision.label(float(score)))
               for (start, stop), score, prob, llr in zip(output.window_spans, scores, probabilities, llrs)]
    return Timeline(str(output.id), output.seconds, decision.threshold, windows, definition.name)


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
            axes.hlines(window.score, window.start_s, window.end_s, colors=colour, lw=2)
        centres = np.array([(w.start_s + w.end_s) / 2 for w in timeline.windows])
        axes.plot(centres, [w.score for w in timeline.windows], "k.", ms=4)
        axes.axhline(timeline.threshold, color="k", ls="--", lw=1, label=f"threshold {timeline.threshold:+.3g}")
        axes.set_xlim(0, max(timeline.seconds, 1e-3))
        axes.set_xlabel("time (s)")
        axes.set_ylabel(f"{timeline.score_name} (higher = real)")
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
