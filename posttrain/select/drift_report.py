"""What ``posttrain drift`` writes and prints: ``drift.json`` (every distance's value, its permutation null,
threshold, p-value and verdict, and where each set's embeddings came from), ``drift.png`` (both sets on
the reference's first two principal components, and both along the line joining their means) and a
table on the console. No torch: a drift between saved embeddings runs without the training stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.select.drift import DriftResult

REPORT_NAME, PLOT_NAME = "drift.json", "drift.png"
PLOT_POINTS = 2000  # points drawn per set at most (a scatter of more says nothing more)


def write_drift_report(out_dir: Path, result: DriftResult, reference: np.ndarray, incoming: np.ndarray,
                       sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """``drift.json`` and ``drift.png`` in ``out_dir``; ``sources``: per role, where its embeddings are."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {"format": "posttrain-drift", "version": 1, **result.to_dict(), "sources": dict(sources)}
    write_bytes_atomic(out_dir / REPORT_NAME,
                       (json.dumps(document, indent=2, default=str) + "\n").encode("utf-8"))
    plot_drift(out_dir / PLOT_NAME, reference, incoming, result)
    return {"report": out_dir / REPORT_NAME, "plot": out_dir / PLOT_NAME}


def format_drift(result: DriftResult) -> str:
    """One line per distance: value, the null's threshold, p-value, verdict."""
    header = (f"reference {result.reference_rows} embeddings, incoming {result.incoming_rows}; null: "
              f"{result.config.permutations} permutations, threshold = its "
              f"{100 * result.config.quantile:g}th percentile")
    rows = [f"{'distance':<12} {'value':>11} {'threshold':>11} {'p-value':>8}  verdict"]
    rows += [f"{r.distance:<12} {r.value:>11.4g} {r.threshold:>11.4g} {r.p_value:>8.3f}  "
             f"{'DRIFT' if r.drift else 'no drift'}" for r in result.results]
    return "\n".join([header, *rows]) + "\n"


def _drawn(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep = rng.choice(len(rows), PLOT_POINTS, replace=False) if len(rows) > PLOT_POINTS else slice(None)
    return np.asarray(rows[keep], dtype=np.float64)


def plot_drift(path: Path, reference: np.ndarray, incoming: np.ndarray, result: DriftResult) -> None:
    """Left: both sets on the reference's first two principal components. Right: histograms along the unit
    direction from the reference mean to the incoming mean (where a shift of the mean shows most)."""
    from posttrain.eval.plots import new_figure, save_png

    rng = np.random.default_rng(result.config.seed)
    ref, inc = _drawn(reference, rng), _drawn(incoming, rng)
    centre = ref.mean(axis=0)
    _, _, components = np.linalg.svd(ref - centre, full_matrices=False)
    axes_2d = components[:2].T
    gap = inc.mean(axis=0) - centre
    along = gap / np.linalg.norm(gap) if np.linalg.norm(gap) > 0 else components[0]

    figure = new_figure(11.0, 4.5)
    scatter, histogram = figure.subplots(1, 2)
    for rows, name, colour in ((ref, "reference", "tab:blue"), (inc, "incoming", "tab:red")):
        points = (rows - centre) @ axes_2d
        scatter.scatter(points[:, 0], points[:, 1] if points.shape[1] > 1 else np.zeros(len(points)), s=6,
                        alpha=0.5, color=colour, label=f"{name} (n={len(rows)})")
    scatter.set_xlabel("reference PC 1")
    scatter.set_ylabel("reference PC 2")
    scatter.legend(fontsize=8)
    projected = {name: (rows - centre) @ along for name, rows in (("reference", ref), ("incoming", inc))}
    edges = np.histogram_bin_edges(np.concatenate(list(projected.values())), bins=50)
    for (name, values), colour in zip(projected.items(), ("tab:blue", "tab:red")):
        histogram.hist(values, bins=edges, density=True, alpha=0.5, color=colour, label=name)
    histogram.set_xlabel("projection on (incoming mean - reference mean)")
    histogram.set_ylabel("density")
    histogram.legend(fontsize=8)
    figure.suptitle("; ".join(f"{r.distance} {r.value:.3g} (threshold {r.threshold:.3g}: "
                              f"{'drift' if r.drift else 'no drift'})" for r in result.results), fontsize=9)
    save_png(figure, path)
