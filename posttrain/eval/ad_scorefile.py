"""AntiDeepfake's score file, written beside posttrain's own so AntiDeepfake's ``evaluation.py`` reads it.

The format is what AntiDeepfake's ``main.py`` (``evaluate()``, nii-yamagishilab/AntiDeepfake 0dea622)
writes with ``pandas.DataFrame({"ID": ..., "Score": ..., "Label": ...}).to_csv(path, index=False)``
and its ``evaluation.py`` reads:

- header ``ID,Score,Label``; comma separated, ``\\n`` line ends, minimal csv quoting (a field holding
  a comma or a quote is quoted, quotes doubled);
- ``Score``: the head's two outputs ``[fake, real]`` as a Python list string, ``"[-3.75, 3.77]"`` (always
  quoted: it holds a comma); every float in its shortest round-trip form (``repr``), as ``str(list)``;
- ``Label``: 1 for real (bona fide), 0 for fake (spoof), an integer.

evaluation.py scores each row with ``softmax(Score)[1]``, P(real) = ``sigmoid(real - fake)``: a monotone
map of posttrain's ``logit_diff``, so the EER is the same (its ``compute_eer`` is the ASVspoof one that
``posttrain.eval.metrics.eer`` follows) unless the sigmoid saturates (``|logit_diff|`` above about 37
rounds P(real) to exactly 1 or 0 in float64, which can tie trials posttrain keeps apart). A one-class
(OC-softmax) head has no logits: AntiDeepfake's ``OCAngleLayer`` saves ``[-cos, cos]`` "to be
compatible with the evaluation tool", and so is a ``cosine`` score written here. Reading such a file
back is ``posttrain.eval.report.read_scores``' job (``posttrain metrics`` takes it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.data.files import write_bytes_atomic
from posttrain.models.score_definitions import COSINE_NAME

ScoreTable = Any  # posttrain.eval.report.ScoreTable (report imports this module: no import back)

ANTIDEEPFAKE_SCORES = "antideepfake_scores.csv"  # the file's name in a report folder
ANTIDEEPFAKE_COLUMNS = ("ID", "Score", "Label")


def antideepfake_pairs(table: ScoreTable) -> np.ndarray | None:
    """The ``[N, 2]`` ``[fake, real]`` pairs AntiDeepfake's Score column holds: the logits when the table
    has them, ``[-cos, cos]`` when every score is a one-class head's cosine, else None (a lone score
    is no pair: the file is not written rather than invented)."""
    if table.logits is not None:
        return np.asarray(table.logits, dtype=np.float64)
    if len(table) and all(name == COSINE_NAME for name in table.score_types):
        return np.stack([-table.scores, table.scores], axis=1)
    return None


def antideepfake_text(table: ScoreTable) -> str | None:
    """``table`` as AntiDeepfake's score file (module docstring), or None when it has no ``[fake, real]`` pairs."""
    pairs = antideepfake_pairs(table)
    if pairs is None:
        return None
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")  # pandas' to_csv: csv.writer, QUOTE_MINIMAL, "\n"
    writer.writerow(ANTIDEEPFAKE_COLUMNS)
    for sample_id, (fake, real), label in zip(table.ids, pairs.tolist(), table.labels.tolist()):
        writer.writerow([sample_id, str([float(fake), float(real)]), int(label)])
    return buffer.getvalue()


def write_antideepfake_scores(path: str | Path, table: ScoreTable) -> Path | None:
    """Write ``table`` as AntiDeepfake's score file (atomically); the path, or None when not written
    (no ``[fake, real]`` pairs: ``antideepfake_pairs``)."""
    text = antideepfake_text(table)
    if text is None:
        return None
    write_bytes_atomic(path, text.encode("utf-8"))
    return Path(path)
