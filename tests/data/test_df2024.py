"""Deepfake-Eval-2024 preparation on a synthetic copy of its layout (ffmpeg-made mp3/m4a/mp4/wav)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from posttrain.data import df2024
from posttrain.data.protocol import read_protocol

HEADER = "Filename,Date,Ground Truth (Real/Fake),Public Comments,Finetuning Set (Train/Test)\n"
RATE = 16000


def ffmpeg_tone(path: Path, seconds: float, rate: int, channels: int = 1) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency=330:sample_rate={rate}:duration={seconds}", "-ac", str(channels), str(path)],
                   check=True)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("df2024")
    audio_dir = root / "audio-data"
    audio_dir.mkdir()
    ffmpeg_tone(audio_dir / "a1.mp3", 9.3, 44100, channels=2)
    ffmpeg_tone(audio_dir / "b2.m4a", 5.2, 48000)
    ffmpeg_tone(audio_dir / "c3.mp4", 1.7, 22050)
    # wav: decoded lengths are exact, so the expected boundaries can be written out by hand
    sf.write(audio_dir / "d4.wav", 0.2 * np.sin(np.arange(int(8.5 * RATE)) * 0.07), RATE)  # 136000 samples
    sf.write(audio_dir / "e5.wav", 0.2 * np.sin(np.arange(12 * 44100) * 0.03), 44100)  # -> 192000 at 16 kHz
    (audio_dir / "f6.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really")
    metadata = root / "audio-metadata-publish.csv"
    metadata.write_text(HEADER + "a1.mp3,2024-03-01,Fake,\"a comment, with comma\",Train\n"
                                 "b2.m4a,2024-03-02,Real,,Test\n"
                                 "c3.mp4,2024-04-01,fake,,test\n"
                                 "d4.wav,2024-05-01,Real,,Train\n"
                                 "e5.wav,2024-05-02,Fake,,Test\n"
                                 "f6.wav,2024-05-03,Real,,Train\n"
                                 "g7.mp3,2024-05-04,Fake,,Test\n")
    out = root / "out"
    result = df2024.prepare_df2024(metadata, audio_dir, out, segment_seconds=(4, 10), progress=False)
    return root, out, result


def test_labels_splits_and_rejects(layout):
    _, out, result = layout
    full = {row.id: row for split in ("train", "test") for row in read_protocol(out / "full" / f"{split}.csv")}
    expected = {"DF2024-a1": ("fake", "train"), "DF2024-b2": ("real", "test"), "DF2024-c3": ("fake", "test"),
                "DF2024-d4": ("real", "train"), "DF2024-e5": ("fake", "test")}
    assert {row_id: (row.label, row.proportion) for row_id, row in full.items()} == expected
    with open(out / "rejects.csv", newline="") as handle:
        rejects = list(csv.DictReader(handle))
    assert [(r["filename"], r["line"]) for r in rejects] == [("f6.wav", "7"), ("g7.mp3", "8")]
    assert "unreadable" in rejects[0]["reason"] and "no such file" in rejects[1]["reason"]
    for row in full.values():
        info = sf.info(str(row.resolved_path(out)))
        assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
        assert row.duration_s == pytest.approx(info.frames / RATE, abs=1e-5)  # CSV keeps 6 digits
    assert full["DF2024-a1"].duration_s == pytest.approx(9.3, abs=0.08)
    assert full["DF2024-b2"].duration_s == pytest.approx(5.2, abs=0.08)
    assert full["DF2024-c3"].duration_s == pytest.approx(1.7, abs=0.08)
    assert full["DF2024-d4"].duration_s == 8.5 and full["DF2024-e5"].duration_s == 12.0


def reference_bounds(num_samples: int, seconds: int, min_seconds: float) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < num_samples:
        bounds.append((start, min(start + seconds * RATE, num_samples)))
        start += seconds * RATE
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_seconds * RATE:
        bounds.pop()
    return bounds


def test_segments_are_exact_and_mapped(layout):
    _, out, _ = layout
    # hand-computed for the exact-length wav files
    hand = {("DF2024-d4", 4): [(0, 64000), (64000, 128000)],  # the 0.5 s rest is below the 1 s minimum
            ("DF2024-d4", 10): [(0, 136000)],  # a short file keeps its only piece
            ("DF2024-e5", 4): [(0, 64000), (64000, 128000), (128000, 192000)],
            ("DF2024-e5", 10): [(0, 160000), (160000, 192000)]}
    for length in (4, 10):
        with open(out / f"{length}s" / "segments.csv", newline="") as handle:
            mapping = list(csv.DictReader(handle))
        protocol = {row.id: row for split in ("train", "test")
                    for row in read_protocol(out / f"{length}s" / f"{split}.csv")}
        assert sorted(protocol) == sorted(record["segment_id"] for record in mapping)
        by_file = {}
        for record in mapping:
            by_file.setdefault(record["file_id"], []).append(record)
        assert sorted(by_file) == ["DF2024-a1", "DF2024-b2", "DF2024-c3", "DF2024-d4", "DF2024-e5"]
        for file_id, records in by_file.items():
            full, _ = sf.read(out / "audio" / "full" / f"{file_id.split('-', 1)[1]}.flac", dtype="int16")
            bounds = [(int(r["start_sample"]), int(r["end_sample"])) for r in records]
            assert bounds == reference_bounds(len(full), length, df2024.DEFAULT_MIN_SEGMENT_SECONDS)
            if (file_id, length) in hand:
                assert bounds == hand[(file_id, length)]
            assert [int(r["index"]) for r in records] == list(range(len(records)))
            for record in records:
                row = protocol[record["segment_id"]]
                samples, rate = sf.read(row.resolved_path(out), dtype="int16")
                start, end = int(record["start_sample"]), int(record["end_sample"])
                assert rate == RATE and np.array_equal(samples, full[start:end])
                assert row.duration_s == pytest.approx((end - start) / RATE, abs=1e-5)
                assert float(record["start_s"]) == pytest.approx(start / RATE, abs=1e-4)
                assert (row.label, row.proportion) == (record["label"], record["split"])
                assert row.id == f"{file_id}-{length}s-{record['index']}"


def test_segment_bounds_edge_cases():
    bounds = lambda n, s, m: [(seg.start_sample, seg.end_sample) for seg in df2024.segment_bounds(n, s, m)]
    assert bounds(4 * RATE, 4, 1.0) == [(0, 64000)]
    assert bounds(4 * RATE + RATE - 1, 4, 1.0) == [(0, 64000)]
    assert bounds(4 * RATE + RATE, 4, 1.0) == [(0, 64000), (64000, 80000)]
    assert bounds(100, 4, 1.0) == [(0, 100)]
    assert bounds(0, 4, 1.0) == []


@pytest.mark.parametrize("row, message", [
    ("x.mp3,2024-01-01,Maybe,,Train\n", r":2: Ground Truth \(Real/Fake\) is 'Maybe'"),
    ("x.mp3,2024-01-01,Real,,Valid\n", r":2: Finetuning Set \(Train/Test\) is 'Valid'"),
    (",2024-01-01,Real,,Train\n", r":2: bad Filename ''"),
    ("x.mp3,2024-01-01,Real,,Train\nx.wav,2024-01-01,Fake,,Test\n", r":3: file stem 'x' repeats line 2"),
])
def test_bad_metadata_rows_are_named(tmp_path, row, message):
    metadata = tmp_path / "meta.csv"
    metadata.write_text(HEADER + row)
    with pytest.raises(df2024.MetadataError, match=message):
        df2024.read_metadata(metadata)


def test_bad_metadata_rows_are_skipped_and_reported_on_request(tmp_path):  # AntiDeepfake's behaviour
    metadata = tmp_path / "meta.csv"
    metadata.write_text(HEADER + "a.mp3,2024,Real,,Train\nx.mp3,2024,Maybe,,Train\n,2024,Real,,Train\n"
                                 "b.mp3,2024,Fake,,Valid\na.wav,2024,Fake,,Test\nc.mp3,2024,Fake,,Test\n")
    files, bad = df2024.read_metadata(metadata, skip_bad_rows=True)
    assert [source.filename for source in files] == ["a.mp3", "c.mp3"]
    assert [(row.line, row.filename) for row in bad] == [(3, "x.mp3"), (4, ""), (5, "b.mp3"), (6, "a.wav")]
    assert "'Maybe'" in bad[0].reason and "repeats line 2" in bad[3].reason
    metadata.write_text(HEADER + "x.mp3,2024,Maybe,,Train\n")
    with pytest.raises(df2024.MetadataError, match=r"no rows left \(1 bad rows skipped\)"):
        df2024.read_metadata(metadata, skip_bad_rows=True)


def test_antideepfake_segmentation_keeps_every_last_piece_and_skips_bad_rows(tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "a.wav", 0.1 * np.sin(np.arange(4 * RATE + 5) * 0.07), RATE)  # last piece: 5 samples
    metadata = tmp_path / "meta.csv"
    metadata.write_text(HEADER + "a.wav,2024,Real,,Train\nb.wav,2024,Real,,Dev\n")
    with pytest.raises(df2024.MetadataError, match=r"meta\.csv:3: Finetuning Set"):
        df2024.prepare_df2024(metadata, audio_dir, tmp_path / "strict", segment_seconds=(4,), progress=False)
    result = df2024.prepare_df2024(metadata, audio_dir, tmp_path / "out", segment_seconds=(4,),
                                   min_segment_seconds=0.0, skip_bad_rows=True, progress=False)
    assert [row.duration_s * RATE for row in result.rows_by_length[4]] == pytest.approx([4 * RATE, 5])
    with open(tmp_path / "out" / "rejects.csv", newline="") as handle:
        (reject,) = list(csv.DictReader(handle))
    assert (reject["filename"], reject["line"]) == ("b.wav", "3") and "skipped" in reject["reason"]
    assert "1 metadata row(s) skipped" in df2024.summary(result)


def test_missing_column_is_named(tmp_path):
    metadata = tmp_path / "meta.csv"
    metadata.write_text("Filename,Date,Label,Finetuning Set\nx.mp3,2024,Real,Train\n")
    with pytest.raises(df2024.MetadataError, match=r"meta\.csv:1: expected one column starting with 'Ground Truth'"):
        df2024.read_metadata(metadata)


def test_cli_with_shards(layout, tmp_path, capsys):
    from posttrain.cli import main

    root, _, _ = layout
    out = tmp_path / "cli"
    assert main(["data", "df2024", "--metadata", str(root / "audio-metadata-publish.csv"), "--audio-dir",
                 str(root / "audio-data"), "--out", str(out), "--segment-seconds", "4", "--shards",
                 "--num-workers", "2", "--no-progress"]) == 0
    assert "2 rejected" in capsys.readouterr().out
    for split in ("train", "test"):
        index = json.loads((out / "shards" / "4s" / split / "index.json").read_text())
        rows = read_protocol(out / "4s" / f"{split}.csv")
        assert index["totals"]["samples"] == len(rows) and index["rejects"] == 0
        assert index["split"] == split and set(index["totals"]["by_proportion"]) == {split}  # no test rows in train
        assert index["totals"]["seconds"] == pytest.approx(sum(row.duration_s for row in rows), abs=1e-3)
