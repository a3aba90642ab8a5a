"""``posttrain select nc`` run as a user would: embeddings + protocol CSV -> selection.csv/json + shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_embedding_set

from posttrain.cli import main as posttrain_main
from posttrain.data.protocol import read_protocol
from posttrain.data.shards import load_index, sample_key

pytestmark = pytest.mark.slow


def corpus_embeddings(rows, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Embeddings with one mode per attack (real around e0, A01 around e1, A02 around e2)."""
    rng = np.random.default_rng(seed)
    axis = {"-": 0, "A01": 1, "A02": 2}
    points = np.stack([5.0 * np.eye(4)[axis[row.attack]] + rng.standard_normal(4) for row in rows]).astype(np.float32)
    meta = [{"id": row.id, "label": row.label, "corpus": row.corpus, "attack": row.attack, "language": row.language,
             "speaker": row.speaker, "shard": "train-000000.tar", "seconds": row.duration_s} for row in rows]
    return points, meta


def nearest_ids(points, meta, members, count) -> set[str]:
    vectors = points[members] / np.linalg.norm(points[members], axis=1, keepdims=True)
    centre = vectors.mean(0)
    gaps = 1 - vectors @ (centre / np.linalg.norm(centre))
    return {meta[members[i]]["id"] for i in np.argsort(gaps, kind="stable")[:count]}


def test_select_nc_writes_the_selection_table_and_shards(make_corpus, tmp_path):
    corpus = make_corpus(num_files=12)
    rows = read_protocol(corpus.protocol)  # what the CSV holds (durations as written)
    points, meta = corpus_embeddings(rows)
    write_embedding_set(tmp_path / "emb", points, meta, model={"name": "tiny-source"})
    out = tmp_path / "sel"
    done = subprocess.run(
        [sys.executable, "-m", "posttrain", "select", "nc", "--embeddings", str(tmp_path / "emb"),
         "--protocol", str(corpus.protocol), "--root", str(corpus.root), "--out", str(out), "--budget", "0.5",
         "--fake-clusters", "2", "--shards", "--max-samples-per-shard", "4"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]

    selected = read_protocol(out / "selection.csv")
    by_id = {row.id: row for row in rows}
    assert all(row == by_id[row.id] for row in selected)  # the original rows, every column
    real = [i for i, row in enumerate(rows) if row.label == "real"]
    assert {row.id for row in selected if row.label == "real"} == nearest_ids(points, meta, real, 3)
    fakes = [row for row in selected if row.label == "fake"]
    assert len(fakes) == 3  # half of 6
    for attack in ("A01", "A02"):  # one cluster per attack, each keeps at least its nearest sample
        members = [i for i, row in enumerate(rows) if row.attack == attack]
        assert nearest_ids(points, meta, members, 1) <= {row.id for row in fakes}

    report = json.loads((out / "selection.json").read_text())
    assert report["merged"]["kept_samples"] == 6 and report["merged"]["samples"] == 12
    assert report["merged"]["selected_by_sources"] == {"1": 6}
    assert report["sources"][0]["model"] == {"name": "tiny-source"}
    assert report["sources"][0]["nc1_after"] < report["sources"][0]["nc1_before"]
    kept_hours = sum(row.duration_s for row in selected) / 3600
    assert report["totals"]["all"]["all"]["kept_hours"] == pytest.approx(kept_hours)
    assert report["totals"]["label"]["real"]["kept_samples"] == 3
    assert sum(entry["kept_samples"] for entry in report["totals"]["attack"].values()) == 6
    assert "A01" in done.stdout and "kept h" in done.stdout

    index = load_index(out / "shards")
    assert index["totals"]["samples"] == 6 and index["rejects"] == 0
    assert {key for shard in index["shards"] for key in shard["keys"]} == {sample_key(row.id) for row in selected}


def test_select_nc_names_an_embedded_id_missing_from_the_protocol(make_corpus, tmp_path, capsys):
    corpus = make_corpus(num_files=6)
    rows = read_protocol(corpus.protocol)
    points, meta = corpus_embeddings(rows)
    meta[2]["id"] = "LJ-not_in_protocol"
    write_embedding_set(tmp_path / "emb", points, meta)
    code = posttrain_main(["select", "nc", "--embeddings", str(tmp_path / "emb"), "--protocol", str(corpus.protocol),
                           "--out", str(tmp_path / "sel")])
    assert code == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "emb") in error and "LJ-not_in_protocol" in error
    assert not (tmp_path / "sel" / "selection.csv").exists()
