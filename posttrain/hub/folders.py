"""Export folders: where ``publish``, ``hub convert``, ``hub download`` (and every later export format)
write, and the one rule for replacing them. A folder is written beside its destination and renamed into
place, so a half-written export never replaces a good one; a marker written last records the export's
kind and its files, so a later export of the same kind may replace the folder (and nothing a user added
to it) without ``--overwrite``. No torch here: a command checks its ``--out`` before loading anything."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

EXPORT_MARKER = ".posttrain-export.json"
EXPORT_MARKER_FORMAT = "posttrain-export"


class ExportError(ValueError):
    """A model folder that cannot be turned into a posttrain detector, or an output folder posttrain will
    not replace, naming the file and field."""


def write_export_folder(out_dir: str | Path, kind: str, write: Callable[[Path], None], *,
                        overwrite: bool = False) -> Path:
    """Call ``write(staging)`` in a fresh folder beside ``out_dir``, mark it as a ``kind`` export and move
    it into place. ``out_dir`` must be absent, empty, or a previous ``kind`` export holding only the files
    that export wrote (``check_out_dir``); ``overwrite`` replaces any folder."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, kind, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        write(staging)
        marker = {"format": EXPORT_MARKER_FORMAT, "kind": kind, "files": _files_under(staging)}
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        os.chmod(staging, 0o755)  # mkdtemp makes 0700 folders
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


def check_out_dir(out_dir: str | Path, kind: str, *, overwrite: bool = False) -> None:
    """Refuse to replace a folder posttrain did not make: ``out_dir`` may be absent, hold no files, or
    be a previous ``kind`` export (its ``EXPORT_MARKER``) with no file that export did not write."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder; choose another --out")
    present = _files_under(out_dir)
    if not present or overwrite:
        return
    fix = "choose another --out, or pass --overwrite to replace the folder whole"
    try:
        marker = json.loads((out_dir / EXPORT_MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        marker = None
    if not isinstance(marker, dict) or marker.get("format") != EXPORT_MARKER_FORMAT:
        raise ExportError(f"{out_dir}: not empty and not a posttrain export (holds {_some(present)}); {fix}")
    if marker.get("kind") != kind:
        raise ExportError(f"{out_dir}: holds a posttrain {marker.get('kind')!r} export, not a {kind!r} one; {fix}")
    foreign = sorted(set(present) - set(marker.get("files", [])) - {EXPORT_MARKER})
    if foreign:
        raise ExportError(f"{out_dir}: holds files the previous export did not write ({_some(foreign)}); move them "
                          f"away, {fix}")


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first, deleted after."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir}: exists and is not a folder")
    retired = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
    os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


