"""Training mixes as data (``shards/*.yaml``): which corpora, where their protocol CSVs live, what they
should hold, and a plan report comparing that with what is on disk before any shard gets built.

A mix lists corpora; each names the recipe that prepares it, its protocol CSV(s) and audio folder
relative to one data root, the protocol proportions of its training/validation splits, its expected
training hours per label, languages and a sampling weight. Resolving a mix for a split gives protocol
rows whose ``$ROOT`` paths point into that one data root, so a whole mix builds with the ordinary shard
builder (``posttrain shards build --mix``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import ConfigError, Section, from_dict, load_yaml, require
from posttrain.data.labels import LABELS
from posttrain.data.protocol import PROPORTIONS, ROOT_PLACEHOLDER, ProtocolRow, read_protocols, write_protocol

SPLITS = ("train", "valid")
# Per-corpus expected hours are rounded to whole hours; their sums may differ from the totals by this much.
TOTAL_TOLERANCE_HOURS = 1.0
SECONDS_PER_HOUR = 3600.0


class MixError(ValueError):
    """A mix that cannot be resolved against a data root (missing protocol CSVs)."""


@dataclass
class Hours(Section):
    real: float = 0.0
    fake: float = 0.0

    def validate(self) -> None:
        for label in LABELS:
            require(getattr(self, label) >= 0, label, "must be >= 0")

    def __getitem__(self, label: str) -> float:
        return getattr(self, label)

    @property
    def total(self) -> float:
        return self.real + self.fake


@dataclass
class Splits(Section):
    """Protocol proportions (train|valid|test|-) that make up each split of a corpus."""

    train: list[str] = field(default_factory=lambda: list(PROPORTIONS))
    valid: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for split in SPLITS:
            for value in getattr(self, split):
                require(value in PROPORTIONS, split, f"unknown proportion {value!r} (expected one of {list(PROPORTIONS)})")
        shared = sorted(set(self.train) & set(self.valid))
        require(not shared, "valid", f"proportions {shared} are in both train and valid")
        require(bool(self.train), "train", "must list at least one proportion")


@dataclass
class CorpusSpec(Section):
    name: str = ""
    recipe: str | None = None  # `posttrain data prepare <recipe>`; None = made some other way
    protocols: list[str] = field(default_factory=list)  # CSV paths or globs, relative to the data root
    audio_root: str = "."  # the corpus folder ($ROOT of its CSVs), relative to the data root
    splits: Splits = field(default_factory=Splits)
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    expected_hours: Hours = field(default_factory=Hours)  # hours of the training split, before weighting
    expected_hours_verified: bool = False
    languages: int | list[str] | None = None  # count, codes, or None = unknown
    weight: float = 1.0  # fraction of the rows kept; 1.0 = as is
    notes: str = ""

    def validate(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        require(self.recipe is None or bool(self.recipe), "recipe", "must not be empty (use null for none)")
        require(bool(self.protocols), "protocols", "must list at least one protocol CSV")
        require(not Path(self.audio_root).is_absolute(), "audio_root", "must be relative to the data root")
        require(bool(self.labels) and all(label in LABELS for label in self.labels), "labels",
                f"must be a non-empty subset of {list(LABELS)}, got {self.labels}")
        for label in LABELS:
            require(label in self.labels or self.expected_hours[label] == 0, f"expected_hours.{label}",
                    f"must be 0: the corpus has no {label} label")
        if isinstance(self.languages, int):
            require(self.languages >= 1, "languages", "must be >= 1")
        elif isinstance(self.languages, list):
            require(bool(self.languages) and len(set(self.languages)) == len(self.languages), "languages",
                    "must be a non-empty list without repeats")
        # Oversampling belongs to the loader (data.train.weights): repeating rows would repeat shard keys.
        require(0 < self.weight <= 1, "weight", f"must be in (0, 1], got {self.weight}")

    @property
    def expected_language_count(self) -> int | None:
        return len(self.languages) if isinstance(self.languages, list) else self.languages


@dataclass
class Mix(Section):
    name: str = ""
    description: str = ""
    source: str = ""
    expected_total_hours: Hours | None = None
    corpora: list[CorpusSpec] = field(default_factory=list)

    def validate(self) -> None:
        require(bool(self.name), "name", "must not be empty")
        require(bool(self.corpora), "corpora", "must list at least one corpus")
        seen: set[str] = set()
        for i, corpus in enumerate(self.corpora):
            require(corpus.name not in seen, f"corpora[{i}].name", f"duplicate corpus {corpus.name!r}")
            seen.add(corpus.name)
        if self.expected_total_hours is not None:
            for label in LABELS:
                total = sum(corpus.expected_hours[label] for corpus in self.corpora)
                require(abs(total - self.expected_total_hours[label]) <= TOTAL_TOLERANCE_HOURS,
                        f"expected_total_hours.{label}",
                        f"the corpora's expected hours sum to {total:g}, not {self.expected_total_hours[label]:g}")

    def corpus(self, name: str) -> CorpusSpec:
        for corpus in self.corpora:
            if corpus.name == name:
                return corpus
        raise KeyError(f"mix {self.name!r} has no corpus {name!r}")

    def expected_hours(self) -> Hours:
        return Hours(**{label: sum(corpus.expected_hours[label] for corpus in self.corpora) for label in LABELS})


def load_mix(path: str | Path) -> Mix:
    """Read and validate a mix YAML; a bad value raises ``ConfigError`` naming the key and the file."""
    try:
        return from_dict(Mix, load_yaml(path))
    except ConfigError as error:
        raise ConfigError(error.key, f"{error.message} (in {path})") from None


# ------------------------------------------------------------------------------------------ resolving


def find_protocols(corpus: CorpusSpec, data_root: str | Path) -> tuple[list[Path], list[str]]:
    """(protocol CSVs found, patterns that matched nothing) of a corpus under the data root."""
    root = Path(data_root)
    found, missing = [], []
    for pattern in corpus.protocols:
        matches = sorted(path for path in root.glob(pattern) if path.is_file())
        if matches:
            found += matches
        else:
            missing.append(pattern)
    return found, missing


def _rebase(path: str, audio_root: str) -> str:
    """A CSV path relative to the corpus folder -> the same file relative to the data root."""
    if Path(audio_root) == Path("."):
        return path
    if path.startswith(ROOT_PLACEHOLDER):
        return f"{ROOT_PLACEHOLDER}/{Path(audio_root).as_posix()}/{path[len(ROOT_PLACEHOLDER):].lstrip('/')}"
    return path if Path(path).is_absolute() else (Path(audio_root) / path).as_posix()


def keep_fraction(row_id: str, weight: float) -> bool:
    """Whether a row survives weight subsampling: a hash of its ID, so the choice is stable when rows are
    added or reordered and needs no seed."""
    if weight >= 1:
        return True
    digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < weight


def split_rows(corpus: CorpusSpec, rows: list[ProtocolRow], split: str, *, weighted: bool = True) -> list[ProtocolRow]:
    """The rows of one split of a corpus (paths rebased onto the data root, weight applied)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    proportions = set(getattr(corpus.splits, split))
    weight = corpus.weight if weighted else 1.0
    return [dataclasses.replace(row, path=_rebase(row.path, corpus.audio_root)) for row in rows
            if row.proportion in proportions and keep_fraction(row.id, weight)]


def mix_rows(mix: Mix, data_root: str | Path, split: str = "train") -> list[ProtocolRow]:
    """Every row of one split of the mix; a corpus without its protocol CSVs is an error naming them."""
    missing = {corpus.name: find_protocols(corpus, data_root)[1] for corpus in mix.corpora}
    missing = {name: patterns for name, patterns in missing.items() if patterns}
    if missing:
        detail = "; ".join(f"{name}: {', '.join(patterns)}" for name, patterns in missing.items())
        raise MixError(f"mix {mix.name!r}: protocol CSV(s) not found under {data_root}: {detail} "
                       "(prepare them with `posttrain data prepare`, see `posttrain shards plan`)")
    rows = []
    for corpus in mix.corpora:
        rows += split_rows(corpus, read_protocols(find_protocols(corpus, data_root)[0]), split)
    return rows


def split_proportions(mix: Mix, split: str) -> tuple[str, ...]:
    """The protocol proportions the mix declares for one split, over all its corpora (what the user asked)."""
    return tuple(sorted({value for corpus in mix.corpora for value in getattr(corpus.splits, split)}))


def write_mix_protocol(mix: Mix, data_root: str | Path, split: str, out: str | Path) -> Path:
    """Write one split of a mix as a single protocol CSV (``$ROOT`` = the data root), atomically."""
    write_protocol(mix_rows(mix, data_root, split), out)
    return Path(out)
