"""Segment-level scores of partially spoofed files, and how well the fake regions are located.

The PartialSpoof convention (Zhang et al., "The PartialSpoof database and countermeasures for the
detection of short fake speech segments embedded in an utterance", 2022): a file is cut into
fixed-resolution segments ``[k r, (k+1) r)`` from its start (the last one truncated at the file's
end), and each segment is one trial.

- Label: a segment is *fake* when it overlaps a spoofed region by at least one sample (so a segment
  that only touches a region at its edge is real); otherwise real. Boundaries are compared in
  samples at 16 kHz, so float rounding never moves a segment across a boundary.
- Score: the overlap-weighted mean of the model's score (``logit_diff``, or the one-class head's ``cosine``)
  of the timeline's windows that overlap the segment (``posttrain.eval.timeline``: the windows that gave
  the file its score).
- Resolutions: those of PartialSpoof's 20/40/80/160/320/640 ms that are at least the timeline's hop
  (``supported_resolutions``): a finer segment gets no new score, only a copy of its neighbour's.

Localisation, per file that holds a spoofed region, at the file decision's threshold (``Decision``:
the calibration's Bayes threshold, else the score's own, e.g. ``logit_diff >= 0`` is real): the region
called fake is the union of the finest segments whose score is below the threshold (``metrics.accepts`` says real).
Reported: the mean IoU of called vs true fake time; the share of those files where any called-fake
time overlaps the true region; the boundary error (seconds from each true boundary inside the file
to the nearest called boundary) and the boundaries with no called boundary at all; the share of
spliced files whose lowest-scoring window overlaps the fake region (no threshold involved); and on
all-real files the share of their time called fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.labels import FAKE_LABEL, REAL_LABEL
from posttrain.eval.metrics import accepts
from posttrain.eval.scoring import threshold_key
from posttrain.models.score_definitions import LOGIT_DIFF, ScoreDefinition

PARTIALSPOOF_RESOLUTIONS_S = (0.02, 0.04, 0.08, 0.16, 0.32, 0.64)
LABEL_RULE = "fake when it overlaps a spoofed region by >= 1 sample (touching is not overlapping)"
SCORE_RULE = "overlap-weighted mean {score} of the timeline windows overlapping the segment"  # .format(score=name)
Span = tuple[int, int]


def resolution_name(resolution_s: float) -> str:
    return f"{round(resolution_s * 1000)}ms"


def supported_resolutions(hop_seconds: float) -> tuple[float, ...]:
    """PartialSpoof's resolutions no finer than the timeline hop; ValueError when there are none."""
    chosen = tuple(r for r in PARTIALSPOOF_RESOLUTIONS_S if round(r * SAMPLE_RATE_HZ) >= round(hop_seconds * SAMPLE_RATE_HZ))
    if not chosen:
        raise ValueError(f"--hop-seconds {hop_seconds:g} is coarser than the coarsest PartialSpoof segment "
                         f"({PARTIALSPOOF_RESOLUTIONS_S[-1]:g} s): segment scores need a hop <= "
                         f"{PARTIALSPOOF_RESOLUTIONS_S[-1]:g} s (e.g. --window-seconds 0.5 --hop-seconds 0.1)")
    return chosen


def segment_grid(num_samples: int, resolution_samples: int) -> np.ndarray:
    """``[S, 2]`` sample spans ``[k r, min((k+1) r, end))``."""
    starts = np.arange(0, num_samples, resolution_samples, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + resolution_samples, num_samples)], axis=1)


def _overlaps(spans: np.ndarray, others: np.ndarray) -> np.ndarray:
    """``[len(spans), len(others)]`` overlap in samples of half-open spans."""
    if len(others) == 0:
        return np.zeros((len(spans), 0), dtype=np.int64)
    spans, others = np.asarray(spans, dtype=np.int64), np.asarray(others, dtype=np.int64)
    low = np.maximum(spans[:, None, 0], others[None, :, 0])
    high = np.minimum(spans[:, None, 1], others[None, :, 1])
    return np.clip(high - low, 0, None)


def segment_labels(grid: np.ndarray, regions: Sequence[Span]) -> np.ndarray:
    """Label ids per segment (``LABEL_RULE``)."""
    fake = _overlaps(grid, np.asarray(regions, dtype=np.int64).reshape(-1, 2)).sum(axis=1) > 0
    return np.where(fake, FAKE_LABEL, REAL_LABEL)


def segment_scores(grid: np.ndarray, window_spans: Sequence[Span], window_scores: np.ndarray) -> np.ndarray:
    """Score per segment (``SCORE_RULE``); every segment of a scored file overlaps some window."""
    weights = _overlaps(grid, np.asarray(window_spans, dtype=np.int64).reshape(-1, 2)).astype(np.float64)
    return weights @ np.asarray(window_scores, dtype=np.float64) / weights.sum(axis=1)


def _mask(num_samples: int, spans: Sequence[Span] | np.ndarray) -> np.ndarray:
    mask = np.zeros(num_samples, dtype=bool)
    for start, stop in spans:
        mask[start:stop] = True
    return mask


def _boundaries(mask: np.ndarray) -> np.ndarray:
    """Sample positions inside the file where the mask changes."""
    return np.flatnonzero(mask[1:] != mask[:-1]) + 1


@dataclass(frozen=True)
class FileLocalisation:
    file: str
    seconds: float
    true_fake_s: float
    called_fake_s: float
    iou: float | None  # None when the file has no spoofed region
    boundary_errors_s: tuple[float, ...]  # one per true boundary that has a called boundary
    missed_boundaries: int  # true boundaries with no called boundary in the file
    lowest_window_hit: bool | None  # None unless the file is part real, part fake


def localise(file: str, num_samples: int, regions: Sequence[Span], window_spans: Sequence[Span],
             window_scores: np.ndarray, threshold: float, resolution_samples: int) -> FileLocalisation:
    grid = segment_grid(num_samples, resolution_samples)
    called_segments = grid[~accepts(segment_scores(grid, window_spans, window_scores), threshold)]
    truth, called = _mask(num_samples, regions), _mask(num_samples, called_segments)
    union = int((truth | called).sum())
    true_edges, called_edges = _boundaries(truth), _boundaries(called)
    errors = (tuple(float(np.abs(called_edges - edge).min()) / SAMPLE_RATE_HZ for edge in true_edges)
              if called_edges.size else ())
    partial = bool(truth.any() and not truth.all())
    lowest = window_spans[int(np.argmin(window_scores))]
    return FileLocalisation(
        file=file, seconds=num_samples / SAMPLE_RATE_HZ, true_fake_s=float(truth.sum()) / SAMPLE_RATE_HZ, called_fake_s=float(called.sum()) / SAMPLE_RATE_HZ,
        iou=float((truth & called).sum()) / union if truth.any() else None, boundary_errors_s=errors,
        missed_boundaries=int(true_edges.size) - len(errors),
        lowest_window_hit=bool(truth[lowest[0]:lowest[1]].any()) if partial else None)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def summarise_localisation(files: Sequence[FileLocalisation], resolution_s: float, threshold: float,
                           score_name: str = LOGIT_DIFF.name) -> dict[str, Any]:
    spoofed = [f for f in files if f.iou is not None]
    real = [f for f in files if f.iou is None]
    errors = [error for f in files for error in f.boundary_errors_s]
    hits = [f.lowest_window_hit for f in files if f.lowest_window_hit is not None]
    return {
        "resolution_s": resolution_s, "score_definition": score_name, threshold_key(score_name): threshold,
        "files_with_spoof": len(spoofed), "real_files": len(real),
        "mean_iou": _mean([f.iou for f in spoofed]),
        "found_rate": _mean([f.iou > 0 for f in spoofed]),
        "boundaries": len(errors) + sum(f.missed_boundaries for f in files), "boundaries_missed":
            sum(f.missed_boundaries for f in files),
        "boundary_error_median_s": float(np.median(errors)) if errors else None,
        "boundary_error_mean_s": _mean(errors),
        "lowest_window_hit_rate": _mean(hits), "spliced_files": len(hits),
        "real_files_called_fake_fraction": (sum(f.called_fake_s for f in real) / sum(f.seconds for f in real)
                                            if real else None),
    }


def _show(value: object, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value) * scale:.{digits}f}{unit}"


def _summary_line(name: str, summary: Mapping[str, Any]) -> str:
    return (f"  {name:<24} IoU {_show(summary['mean_iou'])}  found {_show(summary['found_rate'], 100, '%', 1)}  "
            f"boundary error median {_show(summary['boundary_error_median_s'], 1000, ' ms', 0)} "
            f"mean {_show(summary['boundary_error_mean_s'], 1000, ' ms', 0)} "
            f"(missed {summary['boundaries_missed']}/{summary['boundaries']})  lowest window in fake "
            f"{_show(summary['lowest_window_hit_rate'], 100, '%', 1)} of {summary['spliced_files']}  real time "
            f"called fake {_show(summary['real_files_called_fake_fraction'], 100, '%', 1)}")


def localisation_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report table's lines for the localisation summary: all files, then per attack."""
    name = summary.get("score_definition", LOGIT_DIFF.name)
    return [f"localisation ({_show(summary['resolution_s'] * 1000, digits=0)} ms segments called fake below "
            f"{name} {summary[threshold_key(name)]:+.4g}; {summary['files_with_spoof']} files with spoof, "
            f"{summary['real_files']} real):", _summary_line("all files", summary),
            *(_summary_line(f"attack={name}", group) for name, group in summary.get("by_attack", {}).items())]


def evaluate_segments(outputs: Sequence[Any], regions: Mapping[str, Sequence[Span]], file_samples: Mapping[str, int],
                      *, hop_seconds: float, threshold: float,
                      definition: ScoreDefinition = LOGIT_DIFF) -> dict[str, Any]:
    """Segment trials per resolution and the localisation summary of scored files (``SampleOutput``s
    with their windows). ``regions``/``file_samples``: each file's true spoofed spans and length in
    samples, from the segments sidecar; a scored file missing from it, or of another length, is a
    ValueError (its segment labels would be wrong)."""
    resolutions = supported_resolutions(hop_seconds)
    trials: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {resolution_name(r): ([], []) for r in resolutions}
    located: list[tuple[str, FileLocalisation]] = []
    for out in outputs:
        if out.id not in regions:
            raise ValueError(f"{out.id}: scored but absent from the segments file")
        if out.num_samples != file_samples[out.id]:
            raise ValueError(f"{out.id}: {out.num_samples} samples scored, the segments file covers "
                             f"{file_samples[out.id]}: not the same audio")
        scores = definition.scores(out.window_logits)
        for resolution in resolutions:
            grid = segment_grid(out.num_samples, round(resolution * SAMPLE_RATE_HZ))
            trials[resolution_name(resolution)][0].append(segment_scores(grid, out.window_spans, scores))
            trials[resolution_name(resolution)][1].append(segment_labels(grid, regions[out.id]))
        located.append((str(out.meta.get("attack") or "-"),
                        localise(out.id, out.num_samples, regions[out.id], out.window_spans, scores, threshold,
                                 round(resolutions[0] * SAMPLE_RATE_HZ))))
    files = [file for _, file in located]
    by_attack = {attack: summarise_localisation([file for name, file in located if name == attack], resolutions[0],
                                                threshold, definition.name)
                 for attack in sorted({name for name, _ in located})}
    return {"label_rule": LABEL_RULE, "score_rule": SCORE_RULE.format(score=definition.name),
            "resolutions_s": list(resolutions),
            "trials": {name: (np.concatenate(s), np.concatenate(l)) for name, (s, l) in trials.items()},
            "localisation": {**summarise_localisation(files, resolutions[0], threshold, definition.name),
                             "by_attack": by_attack},
            "files": files}
