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
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, from_dict, load_yaml, require
from posttrain.data.labels import LABELS
from posttrain.data.protocol import PROPORTIONS, ROOT_PLACEHOLDER, ProtocolRow, read_protocols, write_protocol

SPLITS = ("train", "valid")
# Audio-seconds per core-second of `python -m posttrain.bench shards` (decode + resample + FLAC + tar) on
# the 2-core development machine; pass --throughput with the figure measured on the build cluster.
DEFAULT_THROUGHPUT = 550.0
DEFAULT_TOLERANCE_PCT = 10.0
# Per-corpus expected hours are rounded to whole hours; their sums may differ from the totals by this much.
TOTAL_TOLERANCE_HOURS = 1.0
SECONDS_PER_HOUR = 3600.0


class MixError(ValueError):
    """A mix that cannot be resolved against a data root (missing protocol CSVs)."""


@dataclass
class Hours:
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
class Splits:
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
class CorpusSpec:
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
class Mix:
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


# --------------------------------------------------------------------------------------------- plan


@dataclass
class CorpusPlan:
    name: str
    recipe: str | None
    protocols: list[str]  # found, relative to the data root
    missing_protocols: list[str]
    rows: int  # rows of the training split, before weighting
    found_hours: dict[str, float]  # label -> training-split hours on disk
    expected_hours: dict[str, float]
    expected_hours_verified: bool
    deviation_pct: dict[str, float | None]  # None: nothing expected (or nothing found and nothing expected)
    weight: float
    mix_hours: dict[str, float]  # label -> hours that the build takes (after weighting)
    valid_hours: dict[str, float]
    language_hours: dict[str, dict[str, float]]  # language -> label -> training-split hours
    expected_languages: int | None
    flags: list[str]

    @property
    def missing(self) -> bool:
        return not self.protocols


@dataclass
class ShardEstimate:
    num_shards: int
    samples: int
    max_samples_per_shard: int
    max_shard_mb: float
    mean_samples_per_shard: float
    mean_shard_mb_bound: float  # the planner's byte bound (16-bit PCM + headers); FLAC is smaller
    largest_shard_mb_bound: float
    total_gb_bound: float


@dataclass
class BuildEstimate:
    audio_hours: float
    throughput: float  # audio-seconds per core-second
    cores: int
    core_hours: float
    wall_hours: float


@dataclass
class MixPlan:
    mix: str
    data_root: str
    split: str
    tolerance_pct: float
    corpora: list[CorpusPlan]
    found_hours: dict[str, float]
    expected_hours: dict[str, float]
    mix_hours: dict[str, float]
    shards: ShardEstimate
    build: BuildEstimate  # of the rows found
    expected_build: BuildEstimate  # of the expected hours (after weights): the whole mix, before it exists
    prepare_commands: list[str]  # `posttrain data prepare` for each missing protocol CSV with a recipe

    @property
    def missing(self) -> list[str]:
        return [corpus.name for corpus in self.corpora if corpus.missing]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hours_by_label(rows: list[ProtocolRow]) -> dict[str, float]:
    seconds = {label: 0.0 for label in LABELS}
    for row in rows:
        seconds[row.label] += row.duration_s
    return {label: value / SECONDS_PER_HOUR for label, value in seconds.items()}


def _deviation_pct(found: float, expected: float) -> float | None:
    return None if expected == 0 else 100.0 * (found - expected) / expected


def _corpus_flags(corpus: CorpusSpec, plan: CorpusPlan, tolerance_pct: float) -> list[str]:
    if plan.missing:
        return [f"missing: no protocol CSV ({', '.join(plan.missing_protocols)})"]
    flags = [f"missing protocol {pattern}" for pattern in plan.missing_protocols]
    for label in LABELS:
        deviation = plan.deviation_pct[label]
        if deviation is not None and abs(deviation) > tolerance_pct:
            flags.append(f"{label} {deviation:+.1f}%")
        elif deviation is None and plan.found_hours[label] > 0:
            flags.append(f"{label}: {plan.found_hours[label]:.2f} h found, none expected")
    expected_languages = corpus.expected_language_count
    if expected_languages is not None and len(plan.language_hours) != expected_languages:
        flags.append(f"languages {len(plan.language_hours)}/{expected_languages}")
    return flags


def plan_corpus(corpus: CorpusSpec, data_root: str | Path, split: str,
                tolerance_pct: float) -> tuple[CorpusPlan, list[ProtocolRow]]:
    """A corpus's report and the rows the build would take from it."""
    found, missing = find_protocols(corpus, data_root)
    rows = read_protocols(found) if found else []
    unweighted = split_rows(corpus, rows, split, weighted=False)
    taken = [row for row in unweighted if keep_fraction(row.id, corpus.weight)]
    language_seconds: dict[str, dict[str, float]] = defaultdict(lambda: {label: 0.0 for label in LABELS})
    for row in unweighted:
        language_seconds[row.language][row.label] += row.duration_s
    found_hours = _hours_by_label(unweighted)
    expected = {label: corpus.expected_hours[label] for label in LABELS}
    plan = CorpusPlan(
        name=corpus.name, recipe=corpus.recipe,
        protocols=[path.relative_to(data_root).as_posix() for path in found], missing_protocols=missing,
        rows=len(unweighted), found_hours=found_hours, expected_hours=expected,
        expected_hours_verified=corpus.expected_hours_verified,
        deviation_pct={label: _deviation_pct(found_hours[label], expected[label]) for label in LABELS},
        weight=corpus.weight, mix_hours=_hours_by_label(taken),
        valid_hours=_hours_by_label(split_rows(corpus, rows, "valid")) if split == "train" else {},
        language_hours={language: {label: seconds / SECONDS_PER_HOUR for label, seconds in by_label.items()}
                        for language, by_label in sorted(language_seconds.items())},
        expected_languages=corpus.expected_language_count, flags=[])
    plan.flags = _corpus_flags(corpus, plan, tolerance_pct)
    return plan, taken


def estimate_shards(rows: list[ProtocolRow], options: Any) -> ShardEstimate:
    """Shard count and sizes from the shard builder's own deterministic plan."""
    from posttrain.data.shard_build import MEGABYTE, TAR_END_BYTES, plan_shards, row_bytes_bound

    specs = plan_shards(rows, options)
    sizes_mb = [(sum(row_bytes_bound(row, options.duration_tolerance_s) for row in spec.rows) + TAR_END_BYTES)
                / MEGABYTE for spec in specs]
    return ShardEstimate(
        num_shards=len(specs), samples=len(rows), max_samples_per_shard=options.max_samples_per_shard,
        max_shard_mb=options.max_shard_mb, mean_samples_per_shard=len(rows) / len(specs) if specs else 0.0,
        mean_shard_mb_bound=sum(sizes_mb) / len(sizes_mb) if sizes_mb else 0.0,
        largest_shard_mb_bound=max(sizes_mb, default=0.0), total_gb_bound=sum(sizes_mb) / 1000)


def estimate_build(audio_seconds: float, throughput: float, cores: int) -> BuildEstimate:
    if throughput <= 0 or cores < 1:
        raise ValueError(f"throughput must be > 0 and cores >= 1, got {throughput} and {cores}")
    core_seconds = audio_seconds / throughput
    return BuildEstimate(audio_hours=audio_seconds / SECONDS_PER_HOUR, throughput=throughput, cores=cores,
                         core_hours=core_seconds / SECONDS_PER_HOUR,
                         wall_hours=core_seconds / cores / SECONDS_PER_HOUR)


def plan_mix(mix: Mix, data_root: str | Path, *, split: str = "train", options: Any = None,
             throughput: float = DEFAULT_THROUGHPUT, cores: int = 1,
             tolerance_pct: float = DEFAULT_TOLERANCE_PCT) -> MixPlan:
    """Hours on disk vs expected per corpus/label/language, shard count and build time of one split.

    ``options`` are the shard builder's ``BuildOptions`` (default ones if None). Missing corpora are
    reported, not raised: the plan is how one finds out what still needs preparing.
    """
    from posttrain.data.shard_build import BuildOptions

    options = options or BuildOptions()
    corpora, rows = [], []
    for corpus in mix.corpora:
        plan, taken = plan_corpus(corpus, data_root, split, tolerance_pct)
        corpora.append(plan)
        rows += taken
    totals = {key: {label: sum(getattr(plan, key)[label] for plan in corpora) for label in LABELS}
              for key in ("found_hours", "expected_hours", "mix_hours")}
    expected_seconds = SECONDS_PER_HOUR * sum(corpus.expected_hours.total * corpus.weight for corpus in mix.corpora)
    return MixPlan(mix=mix.name, data_root=str(data_root), split=split, tolerance_pct=tolerance_pct,
                   corpora=corpora, **totals, shards=estimate_shards(rows, options),
                   build=estimate_build(sum(row.duration_s for row in rows), throughput, cores),
                   expected_build=estimate_build(expected_seconds, throughput, cores),
                   prepare_commands=prepare_commands(mix, corpora, data_root))


def prepare_commands(mix: Mix, corpora: list[CorpusPlan], data_root: str | Path) -> list[str]:
    """The `posttrain data prepare` call that writes each missing protocol CSV (plain paths, not globs)."""
    root = Path(data_root)
    commands = []
    for spec, plan in zip(mix.corpora, corpora):
        for pattern in plan.missing_protocols:
            if spec.recipe and not any(char in pattern for char in "*?["):
                commands.append(f"posttrain data prepare {spec.recipe} --root {root / spec.audio_root} "
                                f"--out {root / pattern}")
    return commands


def _hours(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 or value == 0 else f"{value:.3g}"


def _deviation(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def format_plan(plan: MixPlan, *, max_languages: int = 25) -> str:
    """The plan as text tables: corpora x labels, languages, shards, build time, flags."""
    header = (f"{'corpus':<20} {'recipe':<18} {'label':<5} {'found h':>10} {'expected h':>11} {'dev':>8} "
              f"{'weight':>6} {'mix h':>10} {'valid h':>8}  flags")
    lines = [f"mix {plan.mix!r}, {plan.split} split, data root {plan.data_root}", header, "-" * len(header)]
    for corpus in plan.corpora:
        shown = [label for label in LABELS if corpus.expected_hours[label] or corpus.found_hours[label]]
        mark = "" if corpus.expected_hours_verified else "*"
        for label in shown or LABELS[:1]:
            lines.append(
                f"{corpus.name if label == (shown or LABELS)[0] else '':<20} "
                f"{corpus.recipe or '-':<18} {label:<5} {_hours(corpus.found_hours[label]):>10} "
                f"{_hours(corpus.expected_hours[label]) + mark:>11} {_deviation(corpus.deviation_pct[label]):>8} "
                f"{corpus.weight:>6.2f} {_hours(corpus.mix_hours[label]):>10} "
                f"{_hours(corpus.valid_hours.get(label, 0.0)):>8}  {'; '.join(corpus.flags)}")
    for label in LABELS:
        lines.append(f"{'total':<20} {'':<18} {label:<5} {_hours(plan.found_hours[label]):>10} "
                     f"{_hours(plan.expected_hours[label]):>11} "
                     f"{_deviation(_deviation_pct(plan.found_hours[label], plan.expected_hours[label])):>8} "
                     f"{'':>6} {_hours(plan.mix_hours[label]):>10}")
    lines.append("(* expected hours not verified against a published per-corpus figure)")

    language_hours: dict[str, dict[str, float]] = defaultdict(lambda: {label: 0.0 for label in LABELS})
    for corpus in plan.corpora:
        for language, by_label in corpus.language_hours.items():
            for label, hours in by_label.items():
                language_hours[language][label] += hours
    ranked = sorted(language_hours.items(), key=lambda item: -sum(item[1].values()))
    lines += ["", f"{len(ranked)} languages found ({plan.split} split)", f"{'language':<12} {'real h':>10} {'fake h':>10}"]
    lines += [f"{language:<12} {_hours(hours['real']):>10} {_hours(hours['fake']):>10}"
              for language, hours in ranked[:max_languages]]
    if len(ranked) > max_languages:
        lines.append(f"... {len(ranked) - max_languages} more (all of them in --json)")

    shards, build = plan.shards, plan.build
    lines += ["", f"shards: {shards.num_shards} for {shards.samples} samples (<= {shards.max_samples_per_shard} samples, "
              f"<= {shards.max_shard_mb:g} MB each); mean {shards.mean_samples_per_shard:.1f} samples, "
              f"<= {shards.mean_shard_mb_bound:.1f} MB (largest <= {shards.largest_shard_mb_bound:.1f} MB), "
              f"<= {shards.total_gb_bound:.1f} GB in all (16-bit PCM bound; FLAC is smaller)",
              f"build: {_hours(build.audio_hours)} h of audio / {build.throughput:g} audio-s per core-s = "
              f"{build.core_hours:,.1f} core-hours; on {build.cores} cores ~{build.wall_hours:,.2f} h "
              f"({math.ceil(build.wall_hours * 60)} min)"]
    expected = plan.expected_build
    lines.append(f"whole mix as expected: {_hours(expected.audio_hours)} h -> {expected.core_hours:,.1f} core-hours; "
                 f"on {expected.cores} cores ~{expected.wall_hours:,.2f} h")
    if plan.missing:
        lines.append(f"MISSING corpora ({len(plan.missing)}): {', '.join(plan.missing)}")
    if plan.prepare_commands:
        lines += ["to prepare them:"] + [f"  {command}" for command in plan.prepare_commands]
    return "\n".join(lines)
