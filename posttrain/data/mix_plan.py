"""The plan report of a training mix (``posttrain shards plan``): what each corpus of a mix
(``posttrain.data.mix``) holds on disk against what it should hold, the shards and the build time it
would take, and the ``posttrain data prepare`` commands of what is missing; before any shard is built."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.labels import LABELS
from posttrain.data.mix import SECONDS_PER_HOUR, CorpusSpec, Mix, find_protocols, keep_fraction, split_rows
from posttrain.data.protocol import ProtocolRow, read_protocols

# Audio-seconds per core-second of `python -m posttrain.bench shards` (decode + resample + FLAC + tar) on
# the 2-core development machine; pass --throughput with the figure measured on the build cluster.
DEFAULT_THROUGHPUT = 550.0
DEFAULT_TOLERANCE_PCT = 10.0

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
    from posttrain.data.shard_plan import MEGABYTE, TAR_END_BYTES, plan_shards, row_bytes_bound

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
    from posttrain.data.shard_plan import BuildOptions

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
