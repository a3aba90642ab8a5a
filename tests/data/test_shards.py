"""Shard building: accounting, rejects, determinism, size bound, round trip, verify, CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from math import gcd
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import webdataset as wds
from conftest import BAD_AUDIO_REASONS

from posttrain.data.protocol import ProtocolRow, read_protocol, write_protocol
from posttrain.data.shard_build import build_shards, merge
from posttrain.data.shard_plan import ShardBuildError
from posttrain.data.shards import iter_shard, load_index, sample_key, verify_shards


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *args], capture_output=True, text=True)


def _hashes(directory: Path) -> dict[str, str]:
    return {shard["name"]: shard["sha256"] for shard in load_index(directory)["shards"]}


def test_index_totals_and_rejects_account_for_every_row(make_corpus, tmp_path):
    corpus = make_corpus(num_files=12, bad=tuple(BAD_AUDIO_REASONS))
    index = build_shards([corpus.protocol], corpus.root, tmp_path / "out", max_samples_per_shard=4, progress=False)
    good = corpus.good_rows
    assert index["totals"]["samples"] + index["rejects"] == len(corpus.rows)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {reject["id"]: reject["reason"] for reject in rejects} == corpus.rejects
    assert all(Path(reject["source_path"]).is_file() != (reject["reason"] == "missing") for reject in rejects)
    assert index["rejects_by_reason"] == dict.fromkeys(["unreadable", "empty", "nan", "too_short", "missing",
                                                        "duration_mismatch", "rate_out_of_range",
                                                        "length_mismatch"], 1)
    for group, field in {"by_label": "label", "by_corpus": "corpus", "by_language": "language",
                         "by_attack": "attack"}.items():
        expected = Counter(getattr(row, field) for row in good)
        assert {value: item["samples"] for value, item in index["totals"][group].items()} == expected, group
        for value, item in index["totals"][group].items():
            seconds = sum(row.duration_s for row in good if getattr(row, field) == value)
            assert item["seconds"] == pytest.approx(seconds, abs=1e-4 * expected[value] + 1e-6), (group, value)
    assert sum(shard["samples"] for shard in index["shards"]) == len(good)
    keys = [key for shard in index["shards"] for key in shard["keys"]]
    assert sorted(keys) == sorted(sample_key(row.id) for row in good)
    assert all("." not in key for key in keys)
    assert verify_shards(tmp_path / "out", progress=False) == []


def test_plan_is_a_seeded_shuffle_independent_of_csv_order(make_corpus, tmp_path):
    corpus = make_corpus(num_files=12)
    reversed_csv = tmp_path / "reversed.csv"
    write_protocol(list(reversed(read_protocol(corpus.protocol))), reversed_csv)
    first = build_shards([corpus.protocol], corpus.root, tmp_path / "a", max_samples_per_shard=4, progress=False)
    build_shards([reversed_csv], corpus.root, tmp_path / "b", max_samples_per_shard=4, progress=False)
    other_seed = build_shards([corpus.protocol], corpus.root, tmp_path / "c", max_samples_per_shard=4, seed=1,
                              progress=False)
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    order = [key for shard in first["shards"] for key in shard["keys"]]
    assert order != [sample_key(row.id) for row in corpus.rows]  # shuffled, not CSV order
    assert order != [key for shard in other_seed["shards"] for key in shard["keys"]]
    assert all(len({key.split("-")[0] for key in shard["keys"]}) > 1 for shard in first["shards"])  # corpora mix


def test_round_trip_equals_independently_resampled_source(tiny_corpus, shard_dir):
    rows = {sample_key(row.id): row for row in tiny_corpus.rows}
    seen = 0
    for shard in load_index(shard_dir)["shards"]:
        lengths = [len(sf.read(io.BytesIO(files["flac"]))[0]) for _, files in iter_shard(shard_dir / shard["name"])]
        assert shard["num_samples"] == lengths  # each key's length, in key order, for the loader's buckets
        for key, files in iter_shard(shard_dir / shard["name"]):
            row, meta = rows[key], json.loads(files["json"])
            stored, rate = sf.read(io.BytesIO(files["flac"]), dtype="float64")
            source, source_rate = sf.read(row.resolved_path(tiny_corpus.root), dtype="float64", always_2d=True)
            divisor = gcd(source_rate, 16000)
            expected = scipy.signal.resample_poly(source.mean(axis=1), 16000 // divisor, source_rate // divisor)
            assert rate == 16000 and stored.ndim == 1 and len(stored) == meta["num_samples"] == len(expected)
            assert meta["orig_sample_rate_hz"] == source_rate and meta["label"] == row.label
            assert meta["id"] == row.id and meta["corpus"] == row.corpus and meta["source_path"] == row.path
            inner = slice(300, -300)
            # compare in the pass band of both resamplers: their transition bands differ
            lowpass = scipy.signal.butter(8, 0.75 * min(source_rate, 16000) / 2, fs=16000, output="sos")
            difference = scipy.signal.sosfiltfilt(lowpass, stored - expected)[inner]
            assert np.abs(difference).max() < (2e-4 if source_rate == 16000 else 1e-2), (key, source_rate)
            seen += 1
    assert seen == len(tiny_corpus.rows)


def test_webdataset_reads_the_shards_in_index_order(shard_dir):
    index = load_index(shard_dir)
    urls = [str(shard_dir / shard["name"]) for shard in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, empty_check=False))
    assert [sample["__key__"] for sample in samples] == [key for shard in index["shards"] for key in shard["keys"]]
    assert all(json.loads(sample["json"])["sample_rate_hz"] == 16000 for sample in samples)


def test_max_shard_mb_is_respected(make_corpus, tmp_path):
    corpus = make_corpus(num_files=12, seconds=(1.0, 2.0))
    index = build_shards([corpus.protocol], corpus.root, tmp_path / "out", max_shard_mb=0.15, progress=False)
    assert len(index["shards"]) > 2
    assert all(shard["bytes"] <= 150_000 for shard in index["shards"])
    assert max(shard["bytes"] for shard in index["shards"]) > 60_000  # the bound is not absurdly loose


def test_m4a_rows_and_duration_mismatch(make_corpus, tmp_path):
    corpus = make_corpus(num_files=3)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=300:duration=1.5:"
                    "sample_rate=48000", "-c:a", "aac", str(corpus.root / "clip.m4a")], check=True)
    rows = read_protocol(corpus.protocol) + [
        ProtocolRow(id="DF-clip", label="fake", duration_s=1.5, path="$ROOT/clip.m4a", attack="A09",
                    proportion="train"),
        ProtocolRow(id="DF-liar", label="fake", duration_s=0.5, path="$ROOT/clip.m4a",  # CSV understates it
                    proportion="train")]
    write_protocol(rows, tmp_path / "p.csv")
    index = build_shards([tmp_path / "p.csv"], corpus.root, tmp_path / "out", progress=False)
    assert index["totals"]["by_attack"]["A09"]["samples"] == 1
    assert index["totals"]["by_attack"]["A09"]["seconds"] == pytest.approx(1.5, abs=0.05)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(reject["id"], reject["reason"]) for reject in rejects] == [("DF-liar", "duration_mismatch")]


def test_console_names_the_rejects_and_the_duration_tolerance_is_an_option(make_corpus, tmp_path):
    corpus = make_corpus(num_files=3, bad=("mismatch", "missing"))
    common = ["shards", "build", "--protocol", str(corpus.protocol), "--root", str(corpus.root), "--no-progress"]
    result = _cli(*common, "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("rejected"))
    assert "rejected 2 rows (" in line and "missing 1" in line and "duration_mismatch 1" in line
    assert line.endswith(f"in {tmp_path / 'a' / 'rejects.jsonl'}")
    result = _cli(*common, "--out", str(tmp_path / "b"), "--duration-tolerance-s", "2.5")  # 1 s vs 3 s: accepted
    assert result.returncode == 0 and load_index(tmp_path / "b")["rejects_by_reason"] == {"missing": 1}


def test_strict_fails_naming_the_file(make_corpus, tmp_path):
    corpus = make_corpus(num_files=4, bad=("nan",))
    result = _cli("shards", "build", "--protocol", str(corpus.protocol), "--root", str(corpus.root),
                  "--out", str(tmp_path / "out"), "--strict", "--no-progress")
    assert result.returncode != 0
    assert "--strict" in result.stderr and "corpus_bad_nan.wav" in result.stderr and "nan:" in result.stderr
    assert not (tmp_path / "out" / "index.json").exists()


def test_bad_protocol_and_key_collision_fail(make_corpus, tmp_path):
    corpus = make_corpus(num_files=2)
    bad = tmp_path / "bad.csv"
    bad.write_text(corpus.protocol.read_text().replace(",real,", ",maybe,", 1))
    result = _cli("shards", "build", "--protocol", str(bad), "--root", str(corpus.root), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and f"{bad}:2: " in result.stderr and "unknown label 'maybe'" in result.stderr
    rows = read_protocol(corpus.protocol)
    write_protocol(rows + [ProtocolRow(id=rows[1].id.replace(".", "_"), label="real", duration_s=1.0,
                                       path=rows[1].path, proportion="train")], tmp_path / "collide.csv")
    with pytest.raises(ShardBuildError, match="map to the same shard key"):
        build_shards([tmp_path / "collide.csv"], corpus.root, tmp_path / "o2", progress=False)


def _rewrite_without(path: Path, key: str) -> None:
    members = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(f"{key}."):
                members.append((member, archive.extractfile(member).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for member, data in members:
            archive.addfile(member, io.BytesIO(data))


def test_verify_catches_flipped_bytes_and_a_missing_sample(shard_dir, tmp_path):
    copy = Path(shutil.copytree(shard_dir, tmp_path / "copy"))
    index = load_index(copy)
    assert _cli("shards", "verify", str(copy), "--no-progress").returncode == 0
    flipped, trimmed = index["shards"][0], index["shards"][1]
    data = bytearray((copy / flipped["name"]).read_bytes())
    data[2000:2016] = bytes(b ^ 0xFF for b in data[2000:2016])  # inside the first sample's FLAC
    (copy / flipped["name"]).write_bytes(bytes(data))
    _rewrite_without(copy / trimmed["name"], trimmed["keys"][1])
    problems = verify_shards(copy, progress=False)
    assert any(p.startswith(f"{flipped['name']}: sha256 differs") for p in problems)
    assert any(p.startswith(f"{flipped['name']} key {flipped['keys'][0]}: flac") for p in problems), problems
    assert any(p.startswith(f"{trimmed['name']}: keys differ") and trimmed["keys"][1] in p for p in problems)
    assert not any(index["shards"][2]["name"] in p for p in problems)
    index["shards"][2]["num_samples"][1] += 1  # a listed length that the audio does not have
    (copy / "index.json").write_text(json.dumps(index))
    assert any(p.startswith(f"{index['shards'][2]['name']}: per-sample durations differ") and
               index["shards"][2]["keys"][1] in p for p in verify_shards(copy, progress=False))
    result = _cli("shards", "verify", str(copy), "--no-progress")
    assert result.returncode == 1 and trimmed["keys"][1] in result.stderr


def test_inspect_and_merge_cli(shard_dir, make_corpus, tmp_path):
    result = _cli("shards", "inspect", str(shard_dir))
    assert result.returncode == 0
    assert all(shard["name"] in result.stdout for shard in load_index(shard_dir)["shards"])
    corpus = make_corpus(num_files=6)
    assert build_shards([corpus.protocol], corpus.root, tmp_path / "split", max_samples_per_shard=1,
                        task_index=0, num_tasks=3, progress=False) is None
    with pytest.raises(ShardBuildError, match=r"4 of 6 planned shards are not built yet; run \(or re-run\) "
                                              r"task\(s\) \[1, 2\] of 3"):
        merge(tmp_path / "split")
    result = _cli("shards", "merge", str(tmp_path / "split"))
    assert result.returncode == 2 and "[1, 2]" in result.stderr
