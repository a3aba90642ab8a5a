"""Score files in and out, and the evaluation report written next to them.

A posttrain score file is a CSV with ``ID,Score,Label,Attack,Language,Corpus,ScoreType`` and, when the
scores come from a two-logit head, ``LogitFake,LogitReal``; ``Label`` is 1 (real) / 0 (fake), so its
first three columns read like AntiDeepfake's ``ID,Score,Label``. Three inputs are read: that file,
AntiDeepfake's score files (``Score`` is the list ``[fake, real]`` of logits) and a plain
``id,score,label`` file from another toolkit. A report is ``metrics.json``, ``metrics.txt`` (the
table), ``det.png``, ``histograms.png`` (``plots``), ``result.yaml``, and the score files other tools read
(``antideepfake_scores.csv``: ``ad_scorefile``; ``arena_scores.txt``: ``arena_scorefile``);
every file is written to a temporary name and renamed, so a half-written file never replaces a good one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import yaml

from posttrain.data.files import write_bytes_atomic
from posttrain.data.labels import label_id
from posttrain.data.shards import REJECTS_NAME, file_sha256
from posttrain.eval.ad_scorefile import ANTIDEEPFAKE_SCORES, write_antideepfake_scores
from posttrain.eval.arena_scorefile import ARENA_SCORES, write_arena_scores
from posttrain.eval.metrics import (ASVSPOOF5_COSTS, METRICS, DetectionCosts, compute_metrics,
                                    group_mask, metrics_by_group, split_classes)
from posttrain.eval.plots import plot_det, plot_histograms
from posttrain.eval.segments import localisation_lines
from posttrain.models.score_definitions import SCORE_DESCRIPTIONS

if TYPE_CHECKING:
    from posttrain.eval.calibration import Calibration

SCORE_COLUMNS = ("ID", "Score", "Label", "Attack", "Language", "Corpus", "ScoreType")
LOGIT_COLUMNS = ("LogitFake", "LogitReal")
# grouping -> whether each group is scored against all bona fide samples (the per-attack convention:
# attack names live on spoofs, bona fide rows carry "-")
GROUPINGS: dict[str, bool] = {"corpus": False, "attack": True, "language": False}
# ScoreType -> meaning (higher = bona fide): each head's score (models.heads), AD's real logit, as written
SCORE_TYPES: dict[str, str] = {**SCORE_DESCRIPTIONS, "real_logit": "real logit",
                               "score": "score as written in the file"}
LOGIT_SCORES = ("logit_diff", "real_logit")
UNKNOWN = "-"
UNKNOWN_SCORING = "not recorded (scores read from a score file)"
REPORT_FILES = {"metrics_json": "metrics.json", "table": "metrics.txt", "det": "det.png",
                "histograms": "histograms.png", "result": "result.yaml"}
# (role, file name, writer): AntiDeepfake's evaluation.py and the Speech Anti-Spoofing Arena read these
EXCHANGE_FILES = (("antideepfake_scores", ANTIDEEPFAKE_SCORES, write_antideepfake_scores),
                  ("arena_scores", ARENA_SCORES, write_arena_scores))
RESULT_FORMAT, RESULT_VERSION = "posttrain-result", 1


class ScoreFileError(ValueError):
    """A score-file problem, located by file and line."""

    def __init__(self, path: str | Path, line: int | None, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}" if line is not None else f"{path}: {message}")


# ----------------------------------------------------------------------------------------- table


def corpus_of(sample_id: str) -> str:
    """The corpus prefix of an ID (before the first ``-``): per-corpus results group by it."""
    return sample_id.split("-", 1)[0]


@dataclass
class ScoreTable:
    """One score per trial, with the metadata the report groups by."""

    ids: list[str]
    scores: np.ndarray  # float64, higher = bona fide
    labels: np.ndarray  # int64, 1 = bona fide (real), 0 = spoof (fake)
    attacks: list[str]
    languages: list[str]
    corpora: list[str]
    score_types: list[str]
    logits: np.ndarray | None = None  # [N, 2] in [fake, real] order, when the scores came from logits
    source_format: str = "posttrain"

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        lengths = {len(column) for column in (self.ids, self.scores, self.labels, self.attacks, self.languages,
                                              self.corpora, self.score_types)}
        if len(lengths) != 1 or (self.logits is not None and self.logits.shape != (len(self.ids), 2)):
            raise ValueError("ScoreTable columns must all have one entry per trial (logits [N, 2])")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def score_types_present(self) -> list[str]:
        return sorted(set(self.score_types))

    @property
    def score_definition(self) -> str:
        """What the scores are, in words (from the ScoreType values present)."""
        return "; ".join(SCORE_TYPES.get(name, name) for name in self.score_types_present)

    def group_values(self, by: str) -> list[str]:
        columns = {"corpus": self.corpora, "attack": self.attacks, "language": self.languages}
        if by not in columns:
            raise ValueError(f"unknown grouping {by!r}; expected one of {sorted(columns)}")
        return columns[by]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], source_format: str = "posttrain") -> ScoreTable:
        """Build from dicts with ``id, score, label`` (1/0 or any ``posttrain.data.labels.LABEL_SPELLINGS`` spelling) and
        optional ``attack, language, corpus, score_type, logit_fake, logit_real``."""
        rows = list(records)
        with_logits = ["logit_fake" in row and "logit_real" in row for row in rows]
        if any(with_logits) and not all(with_logits):
            raise ValueError("either every record has logit_fake and logit_real, or none does")
        ids = [str(row["id"]) for row in rows]
        return cls(ids=ids, scores=np.array([float(row["score"]) for row in rows]),
                   labels=np.array([label_id(row["label"]) for row in rows], dtype=np.int64),
                   attacks=[str(row.get("attack") or UNKNOWN) for row in rows],
                   languages=[str(row.get("language") or UNKNOWN) for row in rows],
                   corpora=[str(row.get("corpus") or corpus_of(sample_id)) for row, sample_id in zip(rows, ids)],
                   score_types=[str(row.get("score_type") or "score") for row in rows],
                   logits=(np.array([[float(row["logit_fake"]), float(row["logit_real"])]
                                     for row in rows]).reshape(-1, 2) if rows and all(with_logits) else None),
                   source_format=source_format)


# --------------------------------------------------------------------------------------- readers


def read_scores(path: str | Path, *, logit_score: str = "logit_diff") -> ScoreTable:
    """Read a posttrain, AntiDeepfake or plain ``id,score,label`` score file (told apart by header).

    ``logit_score`` says how a ``[fake, real]`` logit pair becomes the score (``LOGIT_SCORES``); the
    choice is recorded per row in ``score_types``. Any bad line raises ``ScoreFileError`` (file:line).
    """
    path = Path(path)
    if logit_score not in LOGIT_SCORES:
        raise ValueError(f"logit_score must be one of {LOGIT_SCORES}, got {logit_score!r}")
    if not path.is_file():
        raise ScoreFileError(path, None, "score file not found")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        keys = header
        if "ScoreType" in header:
            parse, source_format = _posttrain_row_parser(header, path), "posttrain"
        elif [name.lower() for name in header] == ["id", "score", "label"]:
            source_format = "antideepfake" if header == ["ID", "Score", "Label"] else "plain"
            keys, parse = ["ID", "Score", "Label"], _id_score_label_parser(logit_score)
        else:
            raise ScoreFileError(path, 1, f"unknown header {header}; expected posttrain columns "
                                          f"{list(SCORE_COLUMNS)} or ID,Score,Label")
        records, first_line = [], {}
        for fields in reader:
            line = reader.line_num
            if not fields or all(not field.strip() for field in fields):
                continue
            if len(fields) != len(header):
                raise ScoreFileError(path, line, f"{len(fields)} fields, header has {len(header)}")
            try:
                record = parse(dict(zip(keys, (field.strip() for field in fields))))
            except ValueError as error:
                raise ScoreFileError(path, line, str(error)) from None
            if record["id"] in first_line:
                first = first_line[record["id"]]
                raise ScoreFileError(path, line, f"duplicate ID {record['id']!r} (first at line {first})")
            if records and ("logit_fake" in record) != ("logit_fake" in records[0]):
                raise ScoreFileError(path, line, "mixes logit-pair and single-number scores")
            first_line[record["id"]] = line
            records.append(record)
    if not records:
        raise ScoreFileError(path, None, "no score rows")
    return ScoreTable.from_records(records, source_format=source_format)


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad {what} {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def _required(row: Mapping[str, str], column: str) -> str:
    if not row.get(column):
        raise ValueError(f"empty {column}")
    return row[column]


def _posttrain_row_parser(header: list[str], path: Path):
    has_logits = [column in header for column in LOGIT_COLUMNS]
    required = ("ID", "Score", "Label", "ScoreType") + (LOGIT_COLUMNS if any(has_logits) else ())
    missing = [column for column in required if column not in header]
    if missing:
        raise ScoreFileError(path, 1, f"missing column(s) {missing}; header is {header}")

    def parse(row: dict[str, str]) -> dict[str, object]:
        record: dict[str, object] = {
            "id": _required(row, "ID"), "score": _finite(row["Score"], "score"), "label": label_id(row["Label"]),
            "attack": row.get("Attack") or UNKNOWN, "language": row.get("Language") or UNKNOWN,
            "corpus": row.get("Corpus") or corpus_of(row["ID"]), "score_type": _required(row, "ScoreType")}
        if all(has_logits):
            record["logit_fake"] = _finite(row["LogitFake"], "LogitFake")
            record["logit_real"] = _finite(row["LogitReal"], "LogitReal")
        return record

    return parse


def _id_score_label_parser(logit_score: str):
    def parse(row: dict[str, str]) -> dict[str, object]:
        record: dict[str, object] = {"id": _required(row, "ID"), "label": label_id(row["Label"])}
        score_text = row["Score"]
        if score_text.startswith("["):
            # AntiDeepfake writes the two head logits, [fake, real], as a Python list string
            if not score_text.endswith("]"):
                raise ValueError(f"bad logit list {score_text!r}")
            values = [_finite(part, "logit") for part in score_text[1:-1].split(",")]
            if len(values) != 2:
                raise ValueError(f"expected 2 logits [fake, real], got {len(values)} in {score_text!r}")
            record["logit_fake"], record["logit_real"] = values
            record["score"] = values[1] - values[0] if logit_score == "logit_diff" else values[1]
            record["score_type"] = logit_score
        else:
            record["score"] = _finite(score_text, "score")
            record["score_type"] = "score"
        return record

    return parse


def write_scores(path: str | Path, table: ScoreTable) -> str:
    """Write ``table`` as a posttrain score file (atomically); returns its sha256."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(SCORE_COLUMNS + (LOGIT_COLUMNS if table.logits is not None else ()))
    # repr keeps every float exactly (shortest round-trip form)
    for i, sample_id in enumerate(table.ids):
        row = [sample_id, repr(float(table.scores[i])), int(table.labels[i]), table.attacks[i],
               table.languages[i], table.corpora[i], table.score_types[i]]
        if table.logits is not None:
            row += [repr(float(table.logits[i, 0])), repr(float(table.logits[i, 1]))]
        writer.writerow(row)
    data = buffer.getvalue().encode("utf-8")
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------- evaluation


SEGMENT_GROUPING = "segment"  # the report's rows of segment-level trials, one per resolution


def evaluate(table: ScoreTable, *, group_by: Sequence[str] = (), calibration: Calibration | None = None,
             costs: DetectionCosts = ASVSPOOF5_COSTS, bootstrap_resamples: int = 0, seed: int = 0,
             threshold: float | None = None,
             segment_trials: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Pooled and per-group metrics of a score table (LLRs from ``calibration`` when given).

    ``segment_trials`` (``posttrain.eval.segments``): ``{resolution: (scores, labels)}`` of segment
    trials, reported with every metric as the rows ``segment=<resolution>``."""
    llr = None if calibration is None else calibration.llr(table.scores)
    options = {"costs": costs, "threshold": threshold, "bootstrap_resamples": bootstrap_resamples, "seed": seed}
    groups = {}
    for by in group_by:
        if by not in GROUPINGS:
            raise ValueError(f"unknown grouping {by!r}; expected one of {sorted(GROUPINGS)}")
        groups[by] = metrics_by_group(table.scores, table.labels, table.group_values(by), llr,
                                      pool_bona_fide=GROUPINGS[by], **options)
    if segment_trials:
        groups[SEGMENT_GROUPING] = {
            name: compute_metrics(scores, labels, None if calibration is None else calibration.llr(scores), **options)
            for name, (scores, labels) in segment_trials.items()}
    return {"score_types": table.score_types_present, "llr_source": "raw score" if llr is None else "calibrated",
            "calibration": None if calibration is None else calibration.to_dict(),
            "pooled": compute_metrics(table.scores, table.labels, llr, **options), "groups": groups}


EER_CI_COLUMN = "EER% CI"  # shown right after the EER column


def _with_eer_ci(cells: Sequence[str], ci_cell: str) -> list[str]:
    """One cell per metric of ``METRICS``, with the EER's confidence interval right after the EER."""
    out = []
    for metric, cell in zip(METRICS, cells):
        out += [cell, ci_cell] if metric.name == "eer" else [cell]
    return out


def format_table(document: Mapping[str, Any], score_definition: str = "") -> str:
    """The human-readable table of ``evaluate``'s output (EER in %)."""
    rows: list[tuple[str, Mapping[str, Any]]] = [("pooled", document["pooled"])]
    for by, groups in document["groups"].items():
        rows += [(f"{by}={name}", metrics) for name, metrics in groups.items()]
    header = ("group", "n", "bona", "spoof", *_with_eer_ci([metric.column for metric in METRICS], EER_CI_COLUMN))
    body = []
    notes: dict[str, str] = {}
    for name, metrics in rows:
        ci = metrics.get("eer_ci")
        ci_text = f"[{ci['low'] * 100:.2f}, {ci['high'] * 100:.2f}]" if ci else "-"
        body.append((name, str(metrics["n"]), str(metrics["n_bona_fide"]), str(metrics["n_spoof"]),
                     *_with_eer_ci([metric.format(metrics[metric.name]) or "n/a" for metric in METRICS], ci_text)))
        if metrics["undefined"].get("eer"):
            notes[name] = metrics["undefined"]["eer"]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: Sequence[str]) -> str:  # group names left-aligned, numbers right-aligned
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(row, widths)))

    text = [f"scoring: {document['scoring']}"] if document.get("scoring") else []
    text += [f"score: {score_definition or ', '.join(document['score_types'])}; "
             f"actDCF/Cllr on: {document['llr_source']}"]
    text += [render(header), "  ".join("-" * width for width in widths), *map(render, body)]
    text += [f"n/a in {name}: {reason}" for name, reason in notes.items()]
    if document.get("segments"):
        segments = document["segments"]
        text += [f"segment=<resolution>: PartialSpoof segments, {segments['label_rule']}; score: {segments['score_rule']}",
                 *localisation_lines(segments["localisation"])]
    return "\n".join(text) + "\n"


# ---------------------------------------------------------------------------------------- report


def _plain(value: object) -> object:
    """JSON/YAML-safe copy (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


MAX_DET_GROUPS = 8  # more curves than this make the DET plot unreadable; the largest groups are drawn


def _det_curves(table: ScoreTable, document: Mapping[str, Any], group_by: Sequence[str]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pooled curve plus the largest groups of the first grouping (those with both classes)."""
    bona, spoof = split_classes(table.scores, table.labels)
    curves = {"pooled": (bona, spoof)} if bona.size and spoof.size else {}
    if group_by:
        by = group_by[0]
        values = np.asarray(table.group_values(by), dtype=object)
        scored = [(name, m) for name, m in document["groups"][by].items() if m["eer"] is not None]
        for name, _ in sorted(scored, key=lambda item: -item[1]["n"])[:MAX_DET_GROUPS]:
            selected = group_mask(values, table.labels, name, pool_bona_fide=GROUPINGS[by])
            curves[f"{by}={name}"] = split_classes(table.scores[selected], table.labels[selected])
    return curves


def _result_document(table: ScoreTable, document: Mapping[str, Any], *, score_file: Path, sha256: str,
                     score_definition: str, model_identity: Mapping[str, Any], data_identity: Mapping[str, Any],
                     skipped: Sequence[Mapping[str, Any]], files: Mapping[str, Path]) -> dict[str, Any]:
    pooled = document["pooled"]
    group_counts = {by: {name: {"bona_fide": m["n_bona_fide"], "spoof": m["n_spoof"]} for name, m in groups.items()}
                    for by, groups in document["groups"].items()}
    return {
        "format": RESULT_FORMAT, "version": RESULT_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "score_file": {"path": str(score_file.resolve()), "sha256": sha256, "format": table.source_format},
        "score_definition": score_definition, "score_types": table.score_types_present,
        "scoring": document["scoring"], "counts": {"trials": len(table), "bona_fide": pooled["n_bona_fide"], "spoof": pooled["n_spoof"],
                   "groups": group_counts},
        "skipped": {"count": len(skipped), "items": list(skipped)},
        "model": dict(model_identity), "data": dict(data_identity),
        "calibration": document["calibration"],
        "metrics": {name: pooled[name] for name in ("eer", "eer_threshold", "eer_ci",
                                                    *(m.name for m in METRICS if m.name != "eer"), "llr_source")},
        "files": {role: path.name for role, path in files.items() if role != "result"},
        "segments": None if not document.get("segments") else {
            **document["segments"],
            "eer": {name: m["eer"] for name, m in document["groups"][SEGMENT_GROUPING].items()}},
    }


def write_report(out_dir: str | Path, scores: ScoreTable | Iterable[Mapping[str, Any]], *,
                 score_definition: str, model_identity: Mapping[str, Any],
                 data_identity: Mapping[str, Any], skipped: Sequence[Mapping[str, Any]] = (),
                 group_by: Sequence[str] = (), calibration: Calibration | None = None,
                 score_file: str | Path | None = None, costs: DetectionCosts = ASVSPOOF5_COSTS,
                 bootstrap_resamples: int = 0, seed: int = 0, threshold: float | None = None,
                 scoring: str = UNKNOWN_SCORING, segments: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``scores`` and write the full report into ``out_dir``.

    ``scores`` is a ``ScoreTable`` or records for ``ScoreTable.from_records``. ``score_file`` is the
    file the scores were read from; when None they are written to ``out_dir/scores.csv`` first, so
    result.yaml always holds the sha256 of a score file. ``skipped`` lists inputs left out upstream
    (e.g. ``{"id": ..., "reason": ...}``), recorded as given. ``scoring`` says how the scores were
    produced (``InferenceConfig.summary()``: AntiDeepfake's protocol or windowed); every report file
    carries it. ``segments``: ``posttrain.eval.segments.evaluate_segments``' output (a partial-spoof
    set): segment EER rows per resolution and the localisation lines. Returns ``{"metrics", "table", "files",
    "score_file_sha256"}`` with ``files`` mapping each report file's role to its path.
    """
    out_dir = Path(out_dir)
    table = scores if isinstance(scores, ScoreTable) else ScoreTable.from_records(scores)
    files = {role: out_dir / name for role, name in REPORT_FILES.items()}
    if score_file is None:
        score_file = files["scores"] = out_dir / "scores.csv"
        sha256 = write_scores(score_file, table)
        for role, name, write in EXCHANGE_FILES:  # files other tools read
            if write(out_dir / name, table):
                files[role] = out_dir / name
    else:
        score_file = Path(score_file)
        sha256 = file_sha256(score_file)
    document = {"score_definition": score_definition, "scoring": scoring,
                **evaluate(table, group_by=group_by, calibration=calibration, costs=costs,
                           bootstrap_resamples=bootstrap_resamples, seed=seed, threshold=threshold,
                           segment_trials=None if segments is None else segments["trials"])}
    if segments is not None:
        document["segments"] = {key: segments[key] for key in ("label_rule", "score_rule", "resolutions_s",
                                                               "localisation")}
    text = format_table(document, score_definition)
    write_bytes_atomic(files["metrics_json"], (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    write_bytes_atomic(files["table"], text.encode("utf-8"))

    curves = _det_curves(table, document, group_by)
    if curves:
        plot_det(files["det"], curves)
    else:
        files.pop("det")  # a DET curve needs both classes
    bona, spoof = split_classes(table.scores, table.labels)
    plot_histograms(files["histograms"], bona, spoof, score_label=score_definition,
                    threshold=document["pooled"]["eer_threshold"])

    if skipped:  # the same one-line-per-input file as a shard build's, so the reasons can be counted alike
        files["rejects"] = out_dir / REJECTS_NAME
        write_bytes_atomic(files["rejects"], "".join(json.dumps(dict(item), sort_keys=True, default=str) + "\n"
                                                     for item in skipped).encode("utf-8"))
    result = _result_document(table, document, score_file=score_file, sha256=sha256,
                              score_definition=score_definition, model_identity=model_identity,
                              data_identity=data_identity, skipped=skipped, files=files)
    write_bytes_atomic(files["result"], yaml.safe_dump(_plain(result), sort_keys=False).encode("utf-8"))
    return {"metrics": document, "table": text, "files": files, "score_file_sha256": sha256}
