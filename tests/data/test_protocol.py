"""Protocol CSV reading: good rows round-trip, every bad row is reported with file:line at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.data.protocol import COLUMNS, ProtocolError, ProtocolRow, read_protocol, read_protocols, write_protocol

HEADER = ",".join(COLUMNS)


def _good(row_id: str, label: str = "real", duration: str = "1.5") -> str:
    return f"{row_id},{label},{duration},16000,$ROOT/a/{row_id}.wav,-,spk1,train,1,wav,16,en"


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rows_round_trip(tmp_path):
    rows = [ProtocolRow(id="LJ-001", label="real", duration_s=1.25, path="$ROOT/x.wav", sample_rate_hz=22050,
                        language="en"),
            ProtocolRow(id="ASV5-T_01", label="fake", duration_s=3.0, path="/abs/y.flac", attack="A07")]
    assert write_protocol(rows, tmp_path / "p.csv") == 2
    again = read_protocol(tmp_path / "p.csv")
    assert again == rows
    assert [row.corpus for row in again] == ["LJ", "ASV5"]
    assert again[0].resolved_path("/data") == Path("/data/x.wav")
    assert again[1].resolved_path("/data") == Path("/abs/y.flac")
    with pytest.raises(ValueError, match=r"\$ROOT"):
        again[0].resolved_path(None)


def test_every_bad_row_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path / "bad.csv", HEADER,
                  _good("LJ-1"),                                   # line 2: fine
                  _good("LJ-2", label="bonafide"),                 # 3: unknown label
                  _good("LJ-3", duration="abc"),                   # 4: bad duration
                  _good("LJ-4", duration="-2"),                    # 5: non-positive duration
                  _good("LJ-5") + ",extra",                        # 6: too many fields
                  "LJ-6,real,1.0",                                 # 7: too few fields
                  _good("LJ-1"),                                   # 8: duplicate of line 2
                  _good("LJ-7").replace(",train,", ",dev,"),       # 9: unknown proportion
                  "",                                              # blank lines are skipped
                  _good("LJ-8"))
    with pytest.raises(ProtocolError) as caught:
        read_protocol(path)
    message = str(caught.value)
    expected = {3: "unknown label 'bonafide'", 4: "bad duration 'abc'", 5: "positive", 6: "13 fields, header has 12",
                7: "3 fields, header has 12", 8: f"duplicate ID 'LJ-1' (first at {path}:2)", 9: "unknown proportion"}
    for line, text in expected.items():
        assert f"{path}:{line}: " in message and text in message, (line, message)
    assert [line for _, line, _ in caught.value.problems] == sorted(expected)
    assert (caught.value.path, caught.value.line) == (str(path), 3)


def test_missing_column_names_header_line(tmp_path):
    path = _write(tmp_path / "nolabel.csv", "ID,Duration,Path", "LJ-1,1.0,a.wav")
    with pytest.raises(ProtocolError, match=rf"{path}:1: missing column\(s\) \['Label'\]"):
        read_protocol(path)


def test_duplicate_ids_across_files_and_missing_file(tmp_path):
    first = _write(tmp_path / "a.csv", HEADER, _good("LJ-1"), _good("LJ-2"))
    second = _write(tmp_path / "b.csv", HEADER, _good("VCTK-1"), _good("LJ-2"))
    with pytest.raises(ProtocolError) as caught:
        read_protocols([first, second, tmp_path / "missing.csv"])
    message = str(caught.value)
    assert f"{second}:3: duplicate ID 'LJ-2' (first at {first}:3)" in message
    assert f"{tmp_path / 'missing.csv'}: protocol file not found" in message
    assert len(read_protocols([first])) == 2
