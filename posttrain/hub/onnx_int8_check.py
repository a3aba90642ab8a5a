"""``posttrain export --format onnx --quantize int8 --int8-check NAME=DATA``: the ONNX export with the int8
model's quality on labelled sets (``posttrain.eval.int8_check``) in its ``posttrain.json`` (``onnx.int8_check``)
and as a table on its card.

The sets are scored inside the staging folder of ``posttrain.hub.folders``: the plain export is written into
a subfolder of it (``export_onnx``), checked there, its ``posttrain.json`` and card rewritten with the numbers
and its files moved up; only then is the whole folder renamed into place. A check that fails (a set with no
scorable trial, one class only) therefore leaves no folder behind and replaces none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.eval.int8_check import CheckSet, check_int8
from posttrain.eval.onnx_runtime import IDENTITY_NAME
from posttrain.hub.folders import EXPORT_MARKER, write_export_folder
from posttrain.hub.onnx_card import render_onnx_card
from posttrain.hub.onnx_export import EXPORT_KIND, export_onnx
from posttrain.models.detector import Detector

CARD_NAME = "README.md"  # what export_onnx writes the card as
UNCHECKED = ".unchecked"  # the plain export's subfolder of the staging folder


def export_onnx_checked(detector: Detector, out_dir: str | Path, identity: Mapping[str, Any],
                        sets: Sequence[CheckSet], *, exported_from: str | None = None,
                        overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """``export_onnx(..., quantize="int8")`` with ``check_int8`` on ``sets`` written into it (module
    docstring); returns the folder and the check's section."""
    checked: dict[str, Any] = {}

    def write(staging: Path) -> None:
        plain = export_onnx(detector, staging / UNCHECKED, identity, quantize="int8", exported_from=exported_from)
        checked.update(check_int8(plain, sets))
        path = plain / IDENTITY_NAME
        document = json.loads(path.read_text(encoding="utf-8"))
        document["onnx"]["int8_check"] = checked
        path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        (plain / CARD_NAME).write_text(render_onnx_card(document), encoding="utf-8")
        (plain / EXPORT_MARKER).unlink()  # the outer folder's marker, written next, lists every file
        for item in plain.iterdir():
            os.replace(item, staging / item.name)
        plain.rmdir()

    return write_export_folder(out_dir, EXPORT_KIND, write, overwrite=overwrite), checked
