"""Test rows never reach a training shard set unasked: every build path honours ``Proportion``."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.protocol import read_protocol, write_protocol
from posttrain.data.shard_build import build_shards, build_task, merge
from posttrain.data.shard_plan import BuildOptions, ShardBuildError
from posttrain.data.shards import ShardFormatError, check_shard_set, load_index, sample_key

PROPORTION_CYCLE = ("train", "valid", "test")


@pytest.fixture
def mixed_corpus(make_corpus, tmp_path):
    """A 12-row corpus whose rows cycle train/valid/test (4 each), as the recipes write them: one CSV."""
    corpus = make_corpus(num_files=12)
    rows = [dataclasses.replace(row, proportion=PROPORTION_CYCLE[i % 3]) for i, row in enumerate(corpus.rows)]
    write_protocol(rows, tmp_path / "mixed.csv")
    return corpus.root, tmp_path / "mixed.csv", rows


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _built_ids(directory: Path) -> set[str]:
    return {key for shard in load_index(directory)["shards"] for key in shard["keys"]}


def _api_one_task(protocol, root, out, **options):
    build_shards([protocol], root, out, progress=False, **options)


def _api_two_tasks_then_merge(protocol, root, out, **options):
    for task in range(2):  # the distributed build: independent tasks, then merge
        build_task([protocol], root, out, BuildOptions(task_index=task, num_tasks=2, progress=False, **options))
    merge(out)


def _cli_build(protocol, root, out, **options):
    flags = [f"--split={options['split']}"] if options.get("split") else []
    flags += ["--mixed-proportions"] if options.get("proportions") else []
    done = _cli("shards", "build", "--protocol", protocol, "--root", root, "--out", out, "--no-progress", *flags)
    if done.returncode:
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        raise ShardBuildError(done.stderr)


BUILDERS = {"api": _api_one_task, "tasks+merge": _api_two_tasks_then_merge, "cli": _cli_build}


@pytest.mark.parametrize("builder", BUILDERS)
def test_mixed_protocol_is_refused_unless_asked_and_split_selects_rows(builder, mixed_corpus, tmp_path):
    root, protocol, rows = mixed_corpus
    build = BUILDERS[builder]
    with pytest.raises(ShardBuildError, match=r"several proportions \(train 4, valid 4, test 4\).*--split"):
        build(protocol, root, tmp_path / "refused")
    assert not list((tmp_path / "refused").glob("*.tar")) and not (tmp_path / "refused" / "index.json").exists()

    for split in PROPORTION_CYCLE:
        out = tmp_path / split
        build(protocol, root, out, split=split)
        index = load_index(out)
        assert _built_ids(out) == {sample_key(row.id) for row in rows if row.proportion == split}
        assert index["split"] == split and not index["mixed_proportions"]
        assert {value: item["samples"] for value, item in index["totals"]["by_proportion"].items()} == {split: 4}
        assert all(shard["name"].startswith(f"{split}-") for shard in index["shards"])
        check_shard_set(out, split)
    with pytest.raises(ShardFormatError, match=r"a train set holding protocol rows of another split \(4 test\)"):
        check_shard_set(tmp_path / "test", "train")

    build(protocol, root, tmp_path / "all", proportions=("train", "valid", "test", "-"))
    index = load_index(tmp_path / "all")
    assert index["mixed_proportions"] and index["split"] == "mixed" and len(_built_ids(tmp_path / "all")) == 12
    check_shard_set(tmp_path / "all", "train")  # asked for: accepted


def test_split_with_no_rows_names_what_the_protocol_holds(make_corpus, tmp_path):
    corpus = make_corpus(num_files=6)  # every row is "train"
    with pytest.raises(ShardBuildError, match=r"no row has --split test; its rows by Proportion: train 6"):
        build_shards([corpus.protocol], corpus.root, tmp_path / "o", split="test", progress=False)


def test_a_single_proportion_names_the_set_after_it(make_corpus, tmp_path):
    corpus = make_corpus(num_files=6)
    rows = [dataclasses.replace(row, proportion="test") for row in read_protocol(corpus.protocol)]
    write_protocol(rows, tmp_path / "test.csv")
    index = build_shards([tmp_path / "test.csv"], corpus.root, tmp_path / "o", progress=False)
    assert index["split"] == "test" and all(shard["name"].startswith("test-") for shard in index["shards"])
    with pytest.raises(ShardFormatError, match="6 test"):
        check_shard_set(tmp_path / "o", "train")


def test_validation_set_needs_both_classes(make_corpus, tmp_path):
    corpus = make_corpus(num_files=8)
    real_only = [row for row in read_protocol(corpus.protocol) if row.label == "real"]
    write_protocol(real_only, tmp_path / "real.csv")
    build_shards([tmp_path / "real.csv"], corpus.root, tmp_path / "o", progress=False)
    check_shard_set(tmp_path / "o", "train")
    with pytest.raises(ShardFormatError, match=r"the validation set has no fake samples"):
        check_shard_set(tmp_path / "o", "valid")
    with pytest.raises(ShardFormatError, match=r"no such shard folder"):
        check_shard_set(tmp_path / "missing", "valid")



@pytest.mark.parametrize("declared", [["train"], ["train", "test"]])
def test_mix_build_keeps_exactly_the_declared_proportions(declared, mixed_corpus, tmp_path):
    import yaml

    from posttrain.cli import main

    root, protocol, rows = mixed_corpus
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"name": "m", "corpora": [
        {"name": "c", "recipe": None, "protocols": [protocol.name], "audio_root": str(Path(root).relative_to(
            protocol.parent)), "splits": {"train": declared, "valid": ["valid"]}}]}))
    out = tmp_path / "shards"
    assert main(["shards", "build", "--mix", str(mix), "--root", str(protocol.parent), "--out", str(out),
                 "--no-progress"]) == 0
    index = load_index(out)
    assert _built_ids(out) == {sample_key(row.id) for row in rows if row.proportion in declared}
    assert index["split"] == "train" and index["mixed_proportions"] == (len(declared) > 1)
    check_shard_set(out, "train")


@pytest.mark.parametrize("case", ["test rows as train", "one-class valid", "unindexed valid"])
def test_training_refuses_an_unfit_shard_set_before_it_starts(case, mixed_corpus, shard_dir, tmp_path, capsys):
    from posttrain.cli import main

    root, protocol, rows = mixed_corpus
    train, valid = shard_dir, tmp_path / "valid"
    if case == "test rows as train":  # checked first: the validation set does not matter
        train = tmp_path / "test"
        build_shards([protocol], root, train, split="test", progress=False)
        key, expected = "data.train.shards[0]", "a train set holding protocol rows of another split (4 test)"
    else:
        valid_rows = [row for row in rows if row.proportion == "valid" and row.label == "real"]
        write_protocol(valid_rows, tmp_path / "valid.csv")
        if case == "one-class valid":
            build_shards([tmp_path / "valid.csv"], root, valid, progress=False)
        else:
            valid.mkdir()
        key, expected = "data.valid.shards[0]", ("the validation set has no fake samples" if case == "one-class valid"
                                                 else "no index.json")
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/posttrain/demo.yaml", f"output_dir={out}", "tracking.enabled=false",
                 f"data.train.shards=[{train}]", f"data.valid.shards=[{valid}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert key in err[0] and expected in err[0] and str(train if key.startswith("data.train") else valid) in err[0]
    assert not out.exists()  # refused before anything was written
