"""In-the-Wild (Müller et al., 2022): public-figure speech and deepfakes of it; evaluation only.

Layout (``release_in_the_wild/``, the root)::

    meta.csv     file,speaker,label     0.wav,Alec Guinness,spoof    (bona-fide | spoof)
    <n>.wav

No split (Proportion ``-``), as in AntiDeepfake's protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from posttrain.data.recipes.base import Entry, Recipe, label_of, read_csv_records


def in_the_wild(root: Path) -> Iterator[Entry]:
    for where, record in read_csv_records(root / "meta.csv", ("file", "speaker", "label")):
        label = label_of(record["label"], ("bona-fide",), ("spoof",), where)
        yield Entry(file_id=Path(record["file"]).stem, label=label, path=root / record["file"],
                    speaker=record["speaker"], language="en", source=where)


RECIPES = [Recipe("in_the_wild", "ItW", in_the_wild, "In-the-Wild, meta.csv + <n>.wav")]
