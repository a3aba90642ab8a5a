"""The demo corpus: real klettres recordings vs espeak-ng speech, built from the installed packages."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from posttrain.data import demo
from posttrain.data.protocol import read_protocol

LANGUAGES = ("fr", "de", "es")


def texts_from_sounds_xml(language: str) -> dict[str, str]:
    """Independent of the module: recording key -> text, straight from the package's sounds.xml."""
    texts = {}
    for sound in ET.parse(demo.KLETTRES_DIR / language / "sounds.xml").getroot().iter("sound"):
        file = Path(sound.get("file"))
        texts[f"{language}-{file.parent.name}-{file.stem}"] = sound.get("name")
    return texts


def read_split_rows(out: Path) -> list:
    return [row for split in ("train", "valid", "test") for row in read_protocol(out / f"{split}.csv")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = demo.build_demo(out, languages=LANGUAGES, max_per_language=30, seed=3, progress=False)
    return out, result


def test_splits_are_by_text_and_hold_both_labels_and_every_language(corpus):
    out, result = corpus
    rows = read_split_rows(out)
    assert len(rows) == len(result.rows) == 2 * 30 * len(LANGUAGES) - len(result.rejected)
    assert not result.rejected
    texts = {key: text for language in LANGUAGES for key, text in texts_from_sounds_xml(language).items()}
    split_of_text = defaultdict(set)
    by_id = {row.id: row for row in rows}
    for row in rows:
        corpus_name, key = row.id.split("-", 1)
        assert corpus_name == ("KLETTRES" if row.label == "real" else "ESPEAK")
        split_of_text[(row.language, texts[key])].add(row.proportion)
        twin = by_id[("ESPEAK-" if row.label == "real" else "KLETTRES-") + key]
        assert twin.proportion == row.proportion and twin.label != row.label
    assert all(len(splits) == 1 for splits in split_of_text.values())
    for split in ("train", "valid", "test"):
        in_split = [row for row in rows if row.proportion == split]
        assert {row.label for row in in_split} == {"real", "fake"}
        assert {row.language for row in in_split} == set(LANGUAGES)
    fakes = [row for row in rows if row.label == "fake"]
    assert {row.attack for row in fakes} <= {attack.name for attack in demo.ATTACKS}
    assert len({row.attack for row in fakes}) == len(demo.ATTACKS)
    assert {row.attack for row in rows if row.label == "real"} == {"-"}


def _format_features(out: Path, rows) -> dict[str, np.ndarray]:
    features = defaultdict(list)
    for row in rows:
        path = row.resolved_path(out)
        info = sf.info(str(path))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1), path
        samples, _ = sf.read(path, dtype="float64")
        assert row.duration_s == pytest.approx(len(samples) / 16000, abs=1e-4)
        seconds = len(samples) / 16000
        features[row.label].append([path.stat().st_size / seconds, 20 * np.log10(np.abs(samples).max()),
                                    20 * np.log10(np.sqrt(np.mean(samples ** 2))), seconds])
    return {label: np.array(values) for label, values in features.items()}


def test_classes_share_format_level_and_size_statistics(corpus):
    out, _ = corpus
    features = _format_features(out, read_split_rows(out))
    real, fake = features["real"], features["fake"]
    # RMS level: both normalised to the same target (peak limiting may lower a few)
    for values in (real[:, 2], fake[:, 2]):
        assert np.median(values) == pytest.approx(demo.TARGET_RMS_DBFS, abs=0.1)
    # bytes per second, peak level and duration: the middle 90 % of each class covers most of the other
    for column in range(4):
        low, high = np.percentile(real[:, column], [5, 95])
        assert np.mean((fake[:, column] >= low) & (fake[:, column] <= high)) > 0.75, column
        low, high = np.percentile(fake[:, column], [5, 95])
        assert np.mean((real[:, column] >= low) & (real[:, column] <= high)) > 0.6, column
    # a trivial classifier on file-format features stays near chance
    inputs = np.vstack([real, fake])
    inputs = (inputs - inputs.mean(0)) / inputs.std(0)
    labels = np.r_[np.ones(len(real)), np.zeros(len(fake))]
    accuracy = cross_val_score(LogisticRegression(), inputs[:, :2], labels, cv=5).mean()
    assert accuracy < 0.7


def test_same_seed_same_corpus_other_seed_other_split(tmp_path):
    def build(out, seed):
        demo.build_demo(out, languages=("en",), max_per_language=6, seed=seed, progress=False)
        return {row.id: (row.proportion, row.attack, hashlib.sha256(row.resolved_path(out).read_bytes()).hexdigest())
                for row in read_split_rows(out)}

    first, again = build(tmp_path / "a", 7), build(tmp_path / "b", 7)
    assert first == again and len(first) == 12
    recordings, _ = demo.list_recordings(demo.KLETTRES_DIR, "it")
    splits = {seed: demo.assign_splits(recordings, seed) for seed in (7, 8)}
    assert splits[7] == demo.assign_splits(recordings, 7)
    assert splits[7] != splits[8]
    assert sorted(splits[7]) == sorted(splits[8])
    assert demo.select(recordings, 10, 7) == demo.select(recordings, 10, 7) != demo.select(recordings, 10, 8)


def test_chain_steps_against_plain_references():
    rate = 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate).astype(np.float32)
    padded = np.concatenate([np.zeros(rate, np.float32), tone, np.zeros(rate, np.float32)])
    trimmed = demo.trim_silence(padded, rate)
    pad = int(demo.TRIM_PAD_S * rate)
    assert len(trimmed) == len(tone) + 2 * pad
    assert np.array_equal(trimmed[pad:-pad], tone)
    level = demo.normalise_level(tone)
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(level.astype(np.float64) ** 2)))
    assert rms_dbfs == pytest.approx(demo.TARGET_RMS_DBFS, abs=1e-3)
    spiky = np.zeros(rate, np.float32)
    spiky[::1000] = 1.0
    assert np.abs(demo.normalise_level(spiky)).max() == pytest.approx(demo.PEAK_LIMIT, rel=1e-6)
    coded = demo.vorbis_roundtrip(tone, rate)
    assert len(coded) == len(tone) and not np.array_equal(coded, tone)
    assert np.corrcoef(coded[1000:-1000], tone[1000:-1000])[0, 1] > 0.99
    with pytest.raises(demo.audio.AudioError, match="silent"):
        demo.trim_silence(np.zeros(rate, np.float32), rate)


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no espeak-ng voice .*'nds'"):
        demo.build_demo(tmp_path, languages=("nds",))


def test_cli(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["data", "demo", "--out", str(tmp_path), "--languages", "de", "--max-per-language", "3",
                 "--seed", "1", "--no-progress"]) == 0
    rows = read_split_rows(tmp_path)
    assert len(rows) == 6 and {row.label for row in rows} == {"real", "fake"}
    assert "6 files" in capsys.readouterr().out
