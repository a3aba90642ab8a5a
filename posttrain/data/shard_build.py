"""Building shard sets: the deterministic plan (``posttrain.data.shard_plan``) built in independent tasks,
resumable, atomic.

Task i of n builds a contiguous range of the plan's shards; each finished shard is moved into
place with ``os.replace`` and recorded in ``.records/<shard>.json``, so a killed task re-run skips
what is done. ``merge`` turns the per-task indexes into ``index.json`` + ``rejects.jsonl``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.data.files import write_text_atomic
from posttrain.data.labels import LABELS
from posttrain.data.protocol import ProtocolRow, read_protocols
from posttrain.data.shards import (FORMAT, INDEX_NAME, REJECTS_NAME, TASK_INDEX_GLOB, TOTAL_GROUPS, VERSION,
                                   file_sha256, sample_key)
from posttrain.data.shard_plan import (BuildOptions, SPLITS, ShardBuildError, ShardSpec, _meta_bytes, asked_mixed,
                                       plan_fingerprint, plan_shards, sample_meta, seconds_range, select_rows,
                                       task_shards)

STAGING_DIR = ".staging"
RECORDS_DIR = ".records"
# Fixed tar member attributes: shards built anywhere, in any split, are byte-identical.
TAR_MTIME = 0
TAR_USER = "posttrain"


def _load_sample(row: ProtocolRow, root: Path | None, options: BuildOptions) -> audio.Waveform:
    """The row's audio, decoded at most to the longest length its ``Duration`` admits (the plan's byte bound)."""
    path = row.resolved_path(root)
    low, high = seconds_range(row, options.duration_tolerance_s)
    tolerance = f"tolerance {options.duration_tolerance_s:g} s + 0.1 %"
    info = audio.probe(path)
    if info.understated:  # the header this row's Duration was likely read from hides part of the data
        raise audio.AudioError("length_mismatch", f"{path}: its header declares {info.duration_s:.2f} s, its data "
                                                  f"holds more; re-encode it and prepare its row again")
    try:
        wave = audio.load(path, min_seconds=options.min_seconds, max_seconds=high, info=info)
    except audio.AudioError as error:
        if error.reason != "too_long":
            raise
        raise audio.AudioError("duration_mismatch", f"{path}: more than {high:.3f} s of audio, the protocol's Duration "
                                                    f"says {row.duration_s:g} s ({tolerance})") from None
    if wave.warnings:  # the header this row's Duration was likely read from disagrees with the data
        raise audio.AudioError("length_mismatch", f"{path}: {wave.warnings[0].split(': ', 1)[1]}")
    if not low <= wave.seconds <= high:
        raise audio.AudioError("duration_mismatch", f"{path}: {wave.seconds:.3f} s of audio, the protocol's Duration "
                                                    f"says {row.duration_s:g} s ({tolerance})")
    return wave


def build_shard(spec: ShardSpec, root: Path | None, out: Path, options: BuildOptions,
                fingerprint: str) -> dict[str, Any]:
    """Write one shard to staging, move it into place, record it; returns its record."""
    import webdataset as wds  # here, not at the top: it imports torch, which planning and --help never need

    staging = out / STAGING_DIR / f"{spec.name}.partial"
    keys, num_samples, rejects = [], [], []
    groups: dict[str, Counter] = {group: Counter() for group in TOTAL_GROUPS}
    group_samples: dict[str, Counter] = {group: Counter() for group in TOTAL_GROUPS}
    with open(staging, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=TAR_MTIME, user=TAR_USER,
                                                        group=TAR_USER) as writer:
        for row in spec.rows:
            try:
                wave = _load_sample(row, root, options)
            except audio.AudioError as error:
                if options.strict:
                    raise ShardBuildError(f"--strict: {row.id} ({row.resolved_path(root)}) rejected: {error}") from None
                rejects.append({"id": row.id, "source_path": str(row.resolved_path(root)), "reason": error.reason,
                                "detail": error.detail, "shard": spec.name})
                continue
            meta = sample_meta(row, len(wave.samples), wave.orig_sample_rate_hz)
            writer.write({"__key__": sample_key(row.id), "flac": audio.encode_flac(wave.samples),
                          "json": _meta_bytes(meta)})
            keys.append(sample_key(row.id))
            num_samples.append(len(wave.samples))
            for group, field in TOTAL_GROUPS.items():
                groups[group][meta[field]] += 1
                group_samples[group][meta[field]] += meta["num_samples"]
    record = {"plan": fingerprint, "index": spec.index, "name": spec.name, "keys": keys, "num_samples": num_samples,
              "rejects": rejects,
              "groups": {group: {value: [groups[group][value], group_samples[group][value]]
                                 for value in sorted(groups[group])} for group in TOTAL_GROUPS}}
    if keys:
        record.update(sha256=file_sha256(staging), bytes=staging.stat().st_size)
        os.replace(staging, out / spec.name)
    else:  # every row rejected: no tar at all (an empty tar would be a shard with nothing to read)
        staging.unlink()
    write_text_atomic(out / RECORDS_DIR / f"{spec.name}.json", json.dumps(record, sort_keys=True))
    return record


def _completed_record(spec: ShardSpec, out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The record of a shard finished by an earlier run of this plan, if its tar is intact."""
    path = out / RECORDS_DIR / f"{spec.name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("plan") != fingerprint:
        raise ShardBuildError(f"{out} holds shards of a different build plan ({path}); use a new --out directory")
    if not record["keys"]:
        return record
    tar = out / spec.name
    intact = tar.is_file() and tar.stat().st_size == record["bytes"] and file_sha256(tar) == record["sha256"]
    return record if intact else None


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one core per worker process: workers, not threads, scale the build


def _run_shards(todo: list[ShardSpec], root: Path | None, out: Path, options: BuildOptions,
                fingerprint: str) -> Iterable[dict[str, Any]]:
    arguments = (root, out, options, fingerprint)
    if options.num_workers == 1 or len(todo) <= 1:
        for spec in todo:
            yield build_shard(spec, *arguments)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(options.num_workers, len(todo)), mp_context=context,
                                                initializer=_init_worker) as pool:
        futures = [pool.submit(build_shard, spec, *arguments) for spec in todo]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def task_index_path(out: Path, task_index: int, num_tasks: int) -> Path:
    return out / f"index.task-{task_index:05d}-of-{num_tasks:05d}.json"


def plan_build(protocols: list[str | Path], options: BuildOptions) -> tuple[BuildOptions, str | None, list[ShardSpec]]:
    """Read and select the protocol rows and plan their shards: (options with the set's name, the
    set's split label, the plan). Writes nothing: every task, and ``--check``, start here."""
    rows, split = select_rows(read_protocols(protocols), options, ", ".join(map(str, protocols)))
    options = dataclasses.replace(options, name=options.name or (split if split in SPLITS else None))
    return options, split, plan_shards(rows, options)


def build_task(protocols: list[str | Path], root: str | Path | None, out: str | Path,
               options: BuildOptions) -> Path:
    """Build (or finish) this task's shards and write its partial index; returns the partial index path."""
    out = Path(out)
    root = Path(root) if root is not None else None
    options, split, specs = plan_build(protocols, options)
    fingerprint = plan_fingerprint(specs, options)
    mine = task_shards(specs, options.task_index, options.num_tasks)
    for directory in (out, out / STAGING_DIR, out / RECORDS_DIR):
        directory.mkdir(parents=True, exist_ok=True)
    records = {spec.index: record for spec in mine
               if (record := _completed_record(spec, out, fingerprint)) is not None}
    todo = [spec for spec in mine if spec.index not in records]
    bar = tqdm(total=len(mine), initial=len(records), unit="shard", disable=None if options.progress else True,
               desc=f"shards task {options.task_index}/{options.num_tasks}")
    with bar:
        for record in _run_shards(todo, root, out, options, fingerprint):
            records[record["index"]] = record
            bar.update(1)
            bar.set_postfix(rejects=sum(len(r["rejects"]) for r in records.values()))
    partial = {"format": f"{FORMAT}-task", "version": VERSION, "plan": fingerprint, "seed": options.seed,
               "task_index": options.task_index, "num_tasks": options.num_tasks, "num_planned_shards": len(specs),
               "split": split, "mixed_proportions": asked_mixed(options),
               "shards": [records[spec.index] for spec in mine]}
    path = task_index_path(out, options.task_index, options.num_tasks)
    write_text_atomic(path, json.dumps(partial, sort_keys=True))
    return path


def _group_totals(records: list[dict[str, Any]], group: str) -> dict[str, list[int]]:
    """``{value: [samples, audio samples at 16 kHz]}`` of one group summed over shard records."""
    counts: dict[str, list[int]] = {label: [0, 0] for label in LABELS} if group == "by_label" else {}
    for record in records:
        for value, (samples, num_samples) in record["groups"][group].items():
            pair = counts.setdefault(value, [0, 0])
            pair[0] += samples
            pair[1] += num_samples
    return dict(sorted(counts.items()))


def _seconds(num_samples: int) -> float:
    return round(num_samples / SAMPLE_RATE_HZ, 6)


def _index_entry(record: dict[str, Any]) -> dict[str, Any]:
    labels = _group_totals([record], "by_label")
    return {"name": record["name"], "samples": len(record["keys"]),
            "seconds": _seconds(sum(pair[1] for pair in labels.values())),
            "labels": {label: labels[label][0] for label in LABELS},
            "sha256": record["sha256"], "bytes": record["bytes"], "keys": record["keys"],
            # per-sample durations for the loader's fitted bucket edges (absent from records of older builds)
            **({"num_samples": record["num_samples"]} if "num_samples" in record else {})}


def _totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    # Sums stay integer (audio samples) until the end, so totals do not depend on the summation order.
    groups = {group: _group_totals(records, group) for group in TOTAL_GROUPS}
    by_label = groups["by_label"].values()
    return {"samples": sum(pair[0] for pair in by_label), "seconds": _seconds(sum(pair[1] for pair in by_label)),
            **{group: {value: {"samples": pair[0], "seconds": _seconds(pair[1])} for value, pair in counts.items()}
               for group, counts in groups.items()}}


def merge(out: str | Path) -> dict[str, Any]:
    """Merge the partial indexes of a shard build into ``index.json`` and ``rejects.jsonl``."""
    out = Path(out)
    partials = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(out.glob(TASK_INDEX_GLOB))]
    if not partials:
        raise ShardBuildError(f"{out}: no partial indexes ({TASK_INDEX_GLOB}); run the build tasks first")
    plans = {partial["plan"] for partial in partials}
    if len(plans) > 1:
        raise ShardBuildError(f"{out}: partial indexes come from {len(plans)} different build plans")
    records = {record["index"]: record for partial in partials for record in partial["shards"]}
    planned = partials[0]["num_planned_shards"]
    missing = sorted(set(range(planned)) - set(records))
    if missing:
        num_tasks = partials[-1]["num_tasks"]
        tasks = sorted({task for task in range(num_tasks) for i in missing
                        if task * planned // num_tasks <= i < (task + 1) * planned // num_tasks})
        raise ShardBuildError(f"{out}: {len(missing)} of {planned} planned shards are not built yet; "
                              f"run (or re-run) task(s) {tasks} of {num_tasks}")
    ordered = [records[i] for i in range(planned)]
    shards = [_index_entry(record) for record in ordered if record["keys"]]
    rejects = [reject for record in ordered for reject in record["rejects"]]
    index = {"format": FORMAT, "version": VERSION, "sample_rate_hz": SAMPLE_RATE_HZ, "seed": partials[0]["seed"],
             "split": partials[0].get("split"), "mixed_proportions": partials[0].get("mixed_proportions", False),
             "shards": shards, "totals": _totals(ordered), "rejects": len(rejects),
             "rejects_by_reason": dict(Counter(reject["reason"] for reject in rejects).most_common())}
    write_text_atomic(out / REJECTS_NAME, "".join(json.dumps(reject, sort_keys=True) + "\n" for reject in rejects))
    write_text_atomic(out / INDEX_NAME, json.dumps(index, indent=1, sort_keys=True) + "\n")
    staging = out / STAGING_DIR
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()
    return index


def build_shards(protocols: list[str | Path], root: str | Path | None, out: str | Path,
                 **options: Any) -> dict[str, Any] | None:
    """Build a shard set (or one task of it) from protocol CSVs; options are ``BuildOptions`` fields.

    A single-task build merges at once and returns the index; task i of n returns ``None`` (run
    ``merge(out)`` once all tasks are done).
    """
    build_options = BuildOptions(**options)
    build_task(protocols, root, out, build_options)
    return merge(out) if build_options.num_tasks == 1 else None
