"""The label map: the two classes, how protocols and shards spell them, and their ids in batches and logits.

Protocol CSVs and shard metadata spell a label ``real`` or ``fake``; batches carry ids (1 = real,
bona fide; 0 = fake, spoof), the order of the detector's logits ``[fake, real]``. Score files from
other toolkits may spell the classes otherwise (``bonafide``/``spoof``, ``1``/``0``): ``label_id``
reads every accepted spelling. Every module that maps a label imports it from here.
"""

from __future__ import annotations

REAL, FAKE = "real", "fake"
LABELS = (REAL, FAKE)  # the spellings protocols and shards use
REAL_LABEL = 1  # label ids: 1 = real (bona fide), 0 = fake; logit order is [fake, real]
FAKE_LABEL = 0
LABEL_IDS = {REAL: REAL_LABEL, FAKE: FAKE_LABEL}
# every spelling accepted from other toolkits' score files, mapped explicitly
GROUP_FIELDS = ("corpus", "attack", "language", "speaker")  # sample metadata that results are grouped by
LABEL_SPELLINGS: dict[str, int] = {**LABEL_IDS, str(REAL_LABEL): REAL_LABEL, str(FAKE_LABEL): FAKE_LABEL,
                                   "bonafide": REAL_LABEL, "bona-fide": REAL_LABEL, "bona fide": REAL_LABEL,
                                   "spoof": FAKE_LABEL}


def label_id(label: object) -> int:
    """The id of any accepted label: an int 0/1, or a spelling of ``LABEL_SPELLINGS`` (any case)."""
    if label in (FAKE_LABEL, REAL_LABEL) and not isinstance(label, (bool, float)):  # already an id
        return int(label)
    key = str(label).strip().lower()
    if key not in LABEL_SPELLINGS:
        raise ValueError(f"unknown label {label!r}; expected one of {sorted(LABEL_SPELLINGS)}")
    return LABEL_SPELLINGS[key]
