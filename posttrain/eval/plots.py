"""The report's PNG figures: DET curves and per-class score histograms, on matplotlib's object API (Agg,
no pyplot state), each file written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.eval.metrics import det_curve


def new_figure(width_in: float = 6.0, height_in: float = 5.0):
    # the object API renders with Agg without touching pyplot's global backend state
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=100)


def save_png(figure, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())


def plot_det(path: str | Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], max_points: int = 20000) -> None:
    """DET curves (probit-scaled FAR vs FRR) of ``{name: (bona fide scores, spoof scores)}``."""
    from scipy.stats import norm

    figure = new_figure()
    axes = figure.add_subplot()
    # zero rates are drawn at half a trial of the largest class, so the axes fit the data size
    floor = max(1e-6, min(0.5 / max(bona.size, spoof.size) for bona, spoof in curves.values()))
    for name, (bona, spoof) in curves.items():
        curve = det_curve(bona, spoof)
        keep = np.unique(np.linspace(0, curve.frr.size - 1, min(curve.frr.size, max_points)).astype(int))
        axes.plot(norm.ppf(np.clip(curve.far[keep], floor, 1 - floor)),
                  norm.ppf(np.clip(curve.frr[keep], floor, 1 - floor)), label=name, linewidth=1.2)
    ticks = np.array([1e-4, 1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999])
    ticks = ticks[(ticks >= floor) & (ticks <= 1 - floor)]
    for set_ticks, set_labels, set_limits in ((axes.set_xticks, axes.set_xticklabels, axes.set_xlim),
                                              (axes.set_yticks, axes.set_yticklabels, axes.set_ylim)):
        set_ticks(norm.ppf(ticks))
        set_labels([f"{tick * 100:g}" for tick in ticks], fontsize=7)
        set_limits(norm.ppf(floor), norm.ppf(1 - floor))
    axes.plot(norm.ppf([floor, 1 - floor]), norm.ppf([floor, 1 - floor]), color="grey", linewidth=0.6,
              linestyle=":", label="EER line")
    axes.set_xlabel("false acceptance rate (spoof accepted) %")
    axes.set_ylabel("false rejection rate (bona fide rejected) %")
    axes.grid(True, linewidth=0.3)
    axes.legend(fontsize=7, loc="upper right")
    save_png(figure, Path(path))


def plot_histograms(path: str | Path, bona: np.ndarray, spoof: np.ndarray, *, score_label: str,
                    threshold: float | None = None) -> None:
    """Per-class score histograms (densities on shared bins) with the EER threshold marked."""
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    edges = np.histogram_bin_edges(np.concatenate([bona, spoof]), bins=60)
    for scores, name, colour in ((bona, "bona fide", "tab:green"), (spoof, "spoof", "tab:red")):
        if scores.size:
            axes.hist(scores, bins=edges, density=True, alpha=0.5, color=colour, label=f"{name} (n={scores.size})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label="EER threshold")
    axes.set_xlabel(score_label)
    axes.set_ylabel("density")
    axes.legend(fontsize=8)
    save_png(figure, Path(path))
