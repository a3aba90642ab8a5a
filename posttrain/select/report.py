"""The NC selection of ``posttrain select nc`` as files: embeddings sets + protocol CSVs -> ``selection.csv``
(the selected rows, every column kept, so the subset re-shards like any corpus) and ``selection.json``
(options, NC1 before/after per embeddings set, kept samples and hours per corpus, label and attack)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.data.protocol import read_protocols, write_protocol
from posttrain.select.embeddings import MANIFEST_NAME, load_embeddings
from posttrain.select.nc import SelectionOptions, SourceSelection, merge_selections, select_source, totals_by


@dataclass
class EmbeddingsSource:
    directory: Path
    embeddings: np.ndarray
    meta: list[dict[str, Any]]
    manifest: dict[str, Any]


@dataclass
class SelectionResult:
    selections: list[SourceSelection]
    kept_rows: int
    totals: dict[str, dict[str, dict[str, float]]]
    report: dict[str, Any]  # the selection.json document


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def read_sources(directories: Sequence[Path], protocol_ids: set[str]) -> list[EmbeddingsSource]:
    """Every embeddings folder with its manifest; an embedded id missing from the protocols is an error."""
    sources = []
    for directory in directories:
        embeddings, meta = load_embeddings(directory)
        missing = [item["id"] for item in meta if item["id"] not in protocol_ids]
        if missing:
            raise ValueError(f"{directory}: {len(missing)} embedded id(s) are in no --protocol CSV, "
                             f"e.g. {missing[:3]}")
        manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
        sources.append(EmbeddingsSource(Path(directory), embeddings, meta, manifest))
    return sources


def select_to_files(embeddings: Sequence[Path], protocols: Sequence[Path], options: SelectionOptions,
                    out_dir: Path) -> SelectionResult:
    """Select from every embeddings set, merge, and write ``selection.csv`` and ``selection.json``."""
    rows = read_protocols(protocols)
    sources = read_sources(embeddings, {row.id for row in rows})
    selections = [select_source(source.embeddings, source.meta, options, name=str(source.directory),
                                model=source.manifest.get("model")) for source in sources]
    metas = [source.meta for source in sources]
    selected_by = merge_selections(selections, metas)
    kept_rows = [row for row in rows if row.id in selected_by]
    write_protocol(kept_rows, Path(out_dir) / "selection.csv")
    records: dict[str, dict[str, Any]] = {}
    for meta in metas:
        for item in meta:
            records.setdefault(item["id"], item)
    totals = totals_by(records, set(selected_by))
    report = {
        "options": asdict(options),
        "embeddings": [str(directory) for directory in embeddings],
        "protocols": [str(path) for path in protocols],
        "sources": [{"directory": selection.name, "model": selection.model, "samples": len(meta),
                     "kept_samples": len(selection.kept_rows), "nc1_before": _finite(selection.nc1_before),
                     "nc1_after": _finite(selection.nc1_after), "groups": [asdict(group) for group in selection.groups]}
                    for selection, meta in zip(selections, metas)],
        "merged": {"samples": len(records), "kept_samples": len(selected_by),
                   "hours": totals["all"]["all"]["hours"] if records else 0.0,
                   "kept_hours": totals["all"]["all"]["kept_hours"] if records else 0.0,
                   "selected_by_sources": {str(sources_count): samples for sources_count, samples
                                           in sorted(Counter(selected_by.values()).items())}},
        "totals": totals,
    }
    write_bytes_atomic(Path(out_dir) / "selection.json", (json.dumps(report, indent=1) + "\n").encode("utf-8"))
    return SelectionResult(selections, len(kept_rows), totals, report)


def format_totals(totals: dict[str, dict[str, dict[str, float]]]) -> str:
    """The kept-audio table: one block per grouping, a line per value."""
    lines = []
    for group, values in totals.items():
        lines.append(f"{group:<24} {'samples':>8} {'kept':>8} {'hours':>9} {'kept h':>9} {'kept %':>7}")
        for value, entry in values.items():
            share = 100 * entry["kept_hours"] / entry["hours"] if entry["hours"] else 0.0
            lines.append(f"{value:<24} {entry['samples']:>8} {entry['kept_samples']:>8} {entry['hours']:>9.4f} "
                         f"{entry['kept_hours']:>9.4f} {share:>6.1f}%")
        lines.append("")
    return "\n".join(lines)
