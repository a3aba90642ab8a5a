"""Long-audio scoring: windows over a file, aggregation of window outputs, and score definitions.

Windows
    A file of ``N`` samples is cut into windows starting at ``0, hop, 2*hop, ...`` of ``window``
    samples each; the first window that reaches the end of the file is the last one. With the default
    ``hop == window`` (13 s, the longest training crop) the windows tile the file without overlap.
    The last window is shorter (what is left). A tail shorter than ``min_tail_seconds`` is not scored
    on its own (a fraction of a second is a noisy score, and shorter than the model's receptive field
    at the extreme): it is merged into the window before it, which then runs to the end of the file
    (at most ``window + min_tail`` long). Every sample of the file is thus covered, and a file no
    longer than ``window + min_tail`` is scored whole in one window. ``window_seconds = 0`` scores
    every file whole (AntiDeepfake's test protocol; unbounded memory on long files).
    Each window is normalised on its own (zero mean, unit variance), as training normalises each crop.

Aggregation (window outputs -> one file output)
    ``mean_logits`` (default): the mean of the window logits weighted by window length in samples.
    A linear head commutes with it: this equals the head applied to the length-weighted mean of the
    pooled window embeddings, and the file's score is the length-weighted mean of the windows'
    (the OC head's outputs ``[-cos, cos]`` average the same way: the file's cosine is the windows' mean).
    ``max_fake``: the file takes the logits (and embedding) of its most fake window, the one with the
    lowest ``logit_diff`` (highest P(fake); the earliest on ties; the OC head's ``logit_diff`` is 2 cos,
    the same window): a file is as fake as its worst window, for audio where only a part is synthetic.

Scores (higher = bona fide)
    The model's head defines the score of record (``posttrain.models.score_definitions.ScoreDefinition``, the model's
    ``score_definition``): ``logit_diff = logit_real - logit_fake`` for the linear head, the ``cosine``
    (column 1) for the one-class head. ``p_real``: for logits ``softmax(logits)[real] = sigmoid(logit_diff)``;
    a cosine is no logit, so its P(real) only comes from a calibration (else none). ``llr`` = the
    calibration's affine map of the score when a calibration is given or stored with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data.protocol import ProtocolRow, row_to_dict
from posttrain.errors import UserError
from posttrain.eval.calibration import Calibration, CalibrationError, calibration_from_dict, load_calibration
from posttrain.eval.metrics import ASVSPOOF5_COSTS, DetectionCosts, accepts
from posttrain.models.score_definitions import LOGIT_DIFF, SCORE_DESCRIPTIONS, ScoreDefinition

# Input quieter than this (RMS, dB full scale) is flagged: the detectors normalise every input to zero
# mean and unit variance, so a near-silent file's noise floor is scored as if it were speech, often
# confidently; such a score says nothing about the recording. Speech sits around -40..-10 dBFS.
NEAR_SILENT_DBFS = -60.0


def near_silent(meta: Mapping[str, Any]) -> bool:
    """Whether a scored input was near-silent (its ``level_dbfs``, recorded when it was decoded)."""
    level = meta.get("level_dbfs")
    return level is not None and level < NEAR_SILENT_DBFS
AGGREGATIONS = ("mean_logits", "max_fake")
PRECISIONS = ("fp32", "bf16")  # inference precision: bf16 is autocast on CUDA only
# what runs the model: torch (any model spec), or onnxruntime on the CPU (a `posttrain export --format onnx`
# folder; posttrain.eval.onnx_runtime)
# onnxruntime-int8: the export's dynamically quantised model.int8.onnx (`posttrain export --quantize int8`)
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")


@dataclass(frozen=True)
class WindowConfig:
    window_seconds: float = 13.0  # 0 = score every file whole
    hop_seconds: float = 13.0
    min_tail_seconds: float = 1.0

    def validate(self) -> None:
        if self.window_seconds < 0:
            raise ValueError(f"window_seconds: must be >= 0 (0 = whole files), got {self.window_seconds}")
        if self.window_seconds > 0 and not 0 < self.hop_seconds <= self.window_seconds:
            raise ValueError(f"hop_seconds: must be in (0, window_seconds={self.window_seconds}], "
                             f"got {self.hop_seconds} (a larger hop would leave audio unscored)")
        if self.min_tail_seconds < 0:
            raise ValueError(f"min_tail_seconds: must be >= 0, got {self.min_tail_seconds}")

    def spans(self, num_samples: int, sample_rate_hz: int = SAMPLE_RATE_HZ) -> list[tuple[int, int]]:
        """``[start, stop)`` sample ranges of the windows of a file (module docstring)."""
        if self.window_seconds == 0:
            return [(0, num_samples)]
        window = max(1, round(self.window_seconds * sample_rate_hz))
        hop = max(1, round(self.hop_seconds * sample_rate_hz))
        min_tail = round(self.min_tail_seconds * sample_rate_hz)
        spans = []
        for start in range(0, max(num_samples, 1), hop):
            stop = min(start + window, num_samples)
            if spans and stop - start < min_tail:
                spans[-1] = (spans[-1][0], num_samples)
            else:
                spans.append((start, stop))
            if stop == num_samples:
                break
        return spans


SCORING_MODES = ("windowed", "antideepfake")


@dataclass(frozen=True)
class InferenceConfig:
    mode: str = "windowed"  # one of SCORING_MODES (posttrain.eval.inference's docstring)
    window: WindowConfig = field(default_factory=WindowConfig)
    aggregation: str = "mean_logits"
    batch_seconds: float = 200.0  # padded audio seconds per forward pass
    max_batch_size: int = 64
    num_buckets: int = 8  # duration buckets of the batcher (also bounds the windows held at once)
    precision: str = "fp32"  # bf16 autocast on CUDA only
    num_workers: int = 0  # decoding processes per rank
    progress: bool = True
    backend: str = "torch"  # one of BACKENDS

    @classmethod
    def antideepfake(cls, **settings: Any) -> "InferenceConfig":
        """AntiDeepfake's test protocol: every file whole and alone (``settings``: precision, workers...)."""
        return cls(mode="antideepfake", window=WindowConfig(0.0, 0.0, 0.0), max_batch_size=1, **settings)

    def validate(self) -> None:
        if self.mode not in SCORING_MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {SCORING_MODES}")
        if self.mode == "antideepfake" and (self.window.window_seconds != 0 or self.max_batch_size != 1):
            raise ValueError("mode: antideepfake scores every file whole (window_seconds 0) and alone "
                             f"(max_batch_size 1), got window_seconds {self.window.window_seconds} and "
                             f"max_batch_size {self.max_batch_size}")
        self.window.validate()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: {self.aggregation!r} is not one of {AGGREGATIONS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {BACKENDS}")
        if self.backend.startswith("onnxruntime") and self.precision != "fp32":
            raise ValueError(f"precision {self.precision}: the onnxruntime backend runs the exported fp32 graph; "
                             f"drop --precision")
        if self.batch_seconds <= 0 or self.max_batch_size < 1 or self.num_buckets < 1 or self.num_workers < 0:
            raise ValueError("batch_seconds must be > 0, max_batch_size and num_buckets >= 1, num_workers >= 0")

    @property
    def max_windows_held(self) -> int:
        """Windows waiting in the batcher at most (``num_buckets`` partial batches), plus the batch running."""
        return (self.num_buckets + 1) * self.max_batch_size

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "summary": self.summary(), **asdict(self.window), "aggregation": self.aggregation,
                "batch_seconds": self.batch_seconds, "max_batch_size": self.max_batch_size,
                "precision": self.precision, "backend": self.backend, "sample_rate_hz": SAMPLE_RATE_HZ,
                "normalisation": "per window, zero mean unit variance, the model's eps (model.input_normalisation)"}

    def summary(self) -> str:
        """One line for reports: how the scores were produced."""
        backend = "" if self.backend == "torch" else f" ({self.backend})"
        return self._summary() + backend

    def _summary(self) -> str:
        if self.mode == "antideepfake":
            return "antideepfake: AntiDeepfake's test protocol, every file whole, batch 1"
        window = self.window
        if window.window_seconds == 0:
            return f"windowed: every file whole, batched (padding masked), {self.precision}"
        return (f"windowed: {window.window_seconds:g} s windows, hop {window.hop_seconds:g} s, "
                f"{self.aggregation} over windows, batched (padding masked), {self.precision}")


def aggregate(lengths: np.ndarray, logits: np.ndarray, embeddings: np.ndarray | None,
              rule: str = "mean_logits") -> tuple[np.ndarray, np.ndarray | None]:
    """Window outputs (in window order) -> the file's ``(logits [2], embedding [D] | None)``."""
    logits = np.asarray(logits, dtype=np.float64)
    if rule == "mean_logits":
        weights = np.asarray(lengths, dtype=np.float64)
        weights = weights / weights.sum()
        pooled = None if embeddings is None else weights @ np.asarray(embeddings, dtype=np.float64)
        return weights @ logits, pooled
    if rule == "max_fake":
        worst = int(np.argmin(logit_diff(logits)))  # argmin returns the first (earliest) on ties
        return logits[worst], None if embeddings is None else np.asarray(embeddings[worst], dtype=np.float64)
    raise ValueError(f"aggregation: unknown rule {rule!r}; expected one of {AGGREGATIONS}")


def logit_diff(logits: np.ndarray) -> np.ndarray:
    """``logit_real - logit_fake`` of ``[..., 2]`` logits in [fake, real] order."""
    logits = np.asarray(logits, dtype=np.float64)
    return logits[..., 1] - logits[..., 0]


def logit_columns(logits: np.ndarray) -> dict[str, float]:
    """The two logits of one output as the columns every score row carries."""
    return {"logit_fake": float(logits[0]), "logit_real": float(logits[1])}


def score_record(sample_id: str, logits: np.ndarray, meta: Mapping[str, Any],
                 definition: ScoreDefinition = LOGIT_DIFF) -> dict[str, Any]:
    """One row of a score file (``posttrain.eval.report`` reads these): the score (``definition``, the
    model's) of ``[fake, real]`` outputs with the sample's label and groups from its metadata; the two
    logits too when the outputs are logits."""
    return {"id": sample_id, "score": float(definition.scores(logits)), "label": meta["label"],
            "attack": meta.get("attack"), "language": meta.get("language"), "corpus": meta.get("corpus"),
            "score_type": definition.name, **(logit_columns(logits) if definition.logits else {})}


def labelled_file_records(outputs: Iterable[Any], rows: Iterable[ProtocolRow], root: str | Path | None,
                          where: str, definition: ScoreDefinition = LOGIT_DIFF) -> list[dict[str, Any]]:
    """Score-file rows of scored audio files, each labelled by the protocol row whose path it is.

    ``outputs`` carry ``id`` (the file path as scored) and ``logits``; ``where`` names the protocol in
    the error raised when a scored file has no row (no row, no label: the file cannot be a trial).
    """
    by_path = {row.resolved_path(root).resolve(): row for row in rows}
    records, unlabelled = [], []
    for out in outputs:
        row = by_path.get(Path(out.id).resolve())
        if row is None:
            unlabelled.append(out.id)
            continue
        records.append(score_record(row.id, out.logits, row_to_dict(row), definition))
    if unlabelled:
        raise UserError(f"{where}: no row for {len(unlabelled)} scored file(s), e.g. {unlabelled[0]}; "
                        f"add them (Path matched after $ROOT = --root) or score only listed files")
    return records


def p_real(logits: np.ndarray, definition: ScoreDefinition = LOGIT_DIFF,
           calibration: Calibration | None = None) -> np.ndarray | None:
    """P(real) of ``[..., 2]`` outputs. Logits: the softmax probability of the real class,
    ``sigmoid(logit_diff)`` (scipy's overflow-free expit). Other scores (the OC head's cosine) are no
    logits: the calibration's posterior when there is one, else None (no probability, never a sigmoid)."""
    from scipy.special import expit

    if definition.logits:
        return expit(logit_diff(logits))
    return None if calibration is None else calibration.probability(definition.scores(logits))


def calibration_from_identity(identity: Mapping[str, Any]) -> Calibration | None:
    """The calibration stored in a model's ``posttrain.json`` (``publish --calibration``), if any."""
    stored = identity.get("calibration")
    if not stored:
        return None
    if not isinstance(stored, dict):
        raise CalibrationError(f"posttrain.json: calibration: expected a mapping, got {type(stored).__name__}")
    return calibration_from_dict(stored, "posttrain.json: calibration")


def resolve_calibration(path: str | Path | None, identity: Mapping[str, Any],
                        definition: ScoreDefinition = LOGIT_DIFF) -> tuple[Calibration | None, str]:
    """``(calibration, where it came from)``: an explicit file wins over the model's stored one. A
    calibration of another score than ``definition`` (the model's) is refused: its LLRs would be wrong."""
    calibration, source = (load_calibration(path), str(path)) if path is not None else \
        (calibration_from_identity(identity), "model posttrain.json")
    if calibration is None:
        return None, "none"
    if calibration.score_definition not in ("", definition.name, definition.description):
        fitted = SCORE_DESCRIPTIONS.get(calibration.score_definition, calibration.score_definition)
        raise CalibrationError(f"{source}: the calibration maps {fitted!r} scores, this model's are "
                               f"{definition.name} ({definition.description}): fit one on its scores")
    return calibration, source


def threshold_key(score_name: str) -> str:
    """The key of a decision threshold in results: ``threshold_logit_diff``, ``threshold_cosine``."""
    return f"threshold_{score_name}"


@dataclass(frozen=True)
class Decision:
    """How a score becomes a bona fide / spoof decision."""

    threshold: float  # on the score; the decision is ``metrics.accepts`` (bona fide when score >= threshold)
    rule: str
    score_name: str = LOGIT_DIFF.name  # the score it thresholds (the model's ScoreDefinition.name)

    @staticmethod
    def of(calibration: Calibration | None, costs: DetectionCosts = ASVSPOOF5_COSTS,
           definition: ScoreDefinition = LOGIT_DIFF, operating_point: str | None = None) -> "Decision":
        """At ``operating_point`` (a name of ``metrics.OPERATING_POINTS``) of the calibration, else at the
        calibration's Bayes threshold, else at the score's own uncalibrated threshold."""
        name = definition.name
        if operating_point is not None:
            if calibration is None:
                raise CalibrationError(f"--operating-point {operating_point}: the model carries no calibration; "
                                       "fit one with its operating points on a development split (`posttrain "
                                       "metrics --fit-calibration DEV_SCORES --dev-split NAME`) and pass --calibration")
            threshold = calibration.operating_threshold(operating_point)
            point = calibration.operating_points[operating_point]
            return Decision(threshold, f"operating point {operating_point} fitted on {calibration.dev_split or 'dev'} "
                                       f"(there FAR {100 * point['far']:.2f} %, FRR {100 * point['frr']:.2f} %): "
                                       f"bona fide when {name} >= {threshold:.6g}", name)
        if calibration is None:
            return Decision(definition.threshold, f"uncalibrated: bona fide when {name} >= {definition.threshold:g} "
                                                  f"({definition.threshold_reason})", name)
        threshold = calibration.score_threshold(costs)
        return Decision(threshold, f"calibrated: bona fide when the LLR >= the Bayes threshold of costs "
                                   f"(P_spoof {costs.p_spoof}, C_miss {costs.c_miss}, C_fa {costs.c_fa}), "
                                   f"i.e. {name} >= {threshold:.6g}", name)

    @property
    def threshold_key(self) -> str:
        return threshold_key(self.score_name)

    def label(self, score: float) -> str:
        return "real" if accepts(score, self.threshold) else "fake"
