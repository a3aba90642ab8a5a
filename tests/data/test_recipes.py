"""Corpus recipes on miniature copies of each official layout, written here with real audio files."""

from __future__ import annotations

import csv
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from posttrain.data.protocol import read_protocol
from posttrain.data.recipes import RECIPES, RecipeError, get_recipe, prepare
from posttrain.data.recipes.base import build_rows


# The rows AntiDeepfake's own protocol scripts wrote for these miniatures (see the README there).
AD_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ad_protocols"


@dataclass
class Layout:
    """A corpus folder under construction and the protocol rows it must produce."""

    root: Path
    expected: dict[str, dict] = field(default_factory=dict)
    durations: dict[Path, float] = field(default_factory=dict)

    def text(self, relative: str, content: str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        return path

    def audio(self, relative: str, rate: int = 16000) -> Path:
        """A short tone; every file gets its own length so durations are really read from headers."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        frames = rate // 10 + 37 * len(self.durations)
        tone = 0.1 * np.sin(np.arange(frames) * 0.05).astype(np.float32)
        if path.suffix == ".m4a":
            raw = path.with_suffix(".tmp.wav")
            sf.write(raw, tone, rate)
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(raw), "-c:a", "aac", str(path)],
                           check=True)
            raw.unlink()
            self.durations[path] = -1.0  # AAC adds encoder priming: its duration is checked loosely
        else:
            sf.write(path, tone, rate)
            self.durations[path] = sf.info(str(path)).frames / rate
        return path

    def expect(self, row_id: str, path: Path, label: str, proportion: str = "-", attack: str = "-",
               speaker: str = "-", language: str = "-") -> None:
        self.expected[row_id] = dict(path=path, label=label, proportion=proportion, attack=attack,
                                     speaker=speaker, language=language)


# ------------------------------------------------------------------------------------------------
# one miniature per recipe


def make_asvspoof2019_la(lay: Layout) -> None:
    protocols = "LA/ASVspoof2019_LA_cm_protocols"
    lay.text(f"{protocols}/ASVspoof2019.LA.cm.train.trn.txt",
             "LA_0079 LA_T_1138215 - - bonafide\nLA_0079 LA_T_1271820 - A01 spoof\n")
    lay.text(f"{protocols}/ASVspoof2019.LA.cm.dev.trl.txt", "LA_0069 LA_D_1047731 - - bonafide\n")
    lay.text(f"{protocols}/ASVspoof2019.LA.cm.eval.trl.txt", "LA_0039 LA_E_2834763 - A11 spoof\n")
    for name, split, label, proportion, attack in [
            ("LA_T_1138215", "train", "real", "train", "-"), ("LA_T_1271820", "train", "fake", "train", "A01"),
            ("LA_D_1047731", "dev", "real", "valid", "-"), ("LA_E_2834763", "eval", "fake", "test", "A11")]:
        path = lay.audio(f"LA/ASVspoof2019_LA_{split}/flac/{name}.flac")
        speaker = {"train": "LA_0079", "dev": "LA_0069", "eval": "LA_0039"}[split]
        lay.expect(f"ASV19LA-{name}", path, label, proportion, attack, speaker, "en")


def _make_asvspoof2021(lay: Layout, track: str, lines: list[str]) -> None:
    lay.text(f"keys/{track}/CM/trial_metadata.txt", "\n".join(lines) + "\n")
    for line in lines:
        fields = line.split()
        path = lay.audio(f"ASVspoof2021_{track}_eval/flac/{fields[1]}.flac")
        label = "real" if fields[5] == "bonafide" else "fake"
        lay.expect(f"ASV21{track}-{fields[1]}", path, label, "test", "-" if label == "real" else fields[4],
                   fields[0], "en")


def make_asvspoof2021_la(lay: Layout) -> None:
    _make_asvspoof2021(lay, "LA", ["LA_0009 LA_E_9332881 alaw ita_tx A07 spoof notrim eval",
                                   "LA_0012 LA_E_5464494 none loc_tx bonafide bonafide notrim progress"])


def make_asvspoof2021_df(lay: Layout) -> None:
    _make_asvspoof2021(lay, "DF", [
        "LA_0023 DF_E_2000011 nocodec asvspoof A14 spoof notrim progress traditional_vocoder - - - -",
        "TGF1 DF_E_2000024 mp3m4a vcc2020 Task2-team12 spoof notrim eval traditional_vocoder Task2 team12 FF G",
        "LA_0031 DF_E_2000055 low_mp3 asvspoof bonafide bonafide notrim eval bonafide - - - -"])


def make_asvspoof5(lay: Layout) -> None:
    # AD's script reads these header-less files with a header: each one's first row (whose audio exists
    # here) must not become a protocol row.
    lay.text("ASVspoof5.train.tsv", "T_4851 T_0000000099 M - - - AC3 A07 spoof -\n"
                                    "T_4850 T_0000000000 F - - - AC3 A05 spoof -\nT_1234 T_0000000001 M - - - - bonafide bonafide -\n")
    lay.text("ASVspoof5.dev.track_1.tsv", "D_0001 D_0000000001 F - - - - bonafide bonafide -\n"
                                          "D_4461 D_0000000169 F - - - AC1 A14 spoof -\n")
    lay.audio("ASVspoof5_train/flac_T/T_0000000099.flac")
    lay.audio("ASVspoof5_dev/flac_D/D_0000000001.flac")
    for name, folder, label, proportion, attack, speaker in [
            ("T_0000000000", "ASVspoof5_train/flac_T", "fake", "train", "A05", "T_4850"),
            ("T_0000000001", "ASVspoof5_train/flac_T", "real", "train", "bonafide", "T_1234"),
            ("D_0000000169", "ASVspoof5_dev/flac_D", "fake", "valid", "A14", "D_4461")]:
        lay.expect(f"ASV5-{attack}-{name}", lay.audio(f"{folder}/{name}.flac"), label, proportion,
                   "-" if label == "real" else attack, speaker, "en")


def make_mls(lay: Layout) -> None:
    lay.text("mls_german/train/transcripts.txt", "1844_931_000001\tein satz\n10148_10119_000002\tnoch einer\n")
    lay.text("mls_german/train/segments.txt", "1844_931_000001\thttp://example/a.mp3\t0.0\t1.0\n")
    lay.text("mls_italian/test/transcripts.txt", "6892_5944_000010\tfrase\n")
    for language, folder, utterance, proportion in [("de", "mls_german/train", "1844_931_000001", "train"),
                                                    ("de", "mls_german/train", "10148_10119_000002", "train"),
                                                    ("it", "mls_italian/test", "6892_5944_000010", "test")]:
        speaker, book, _ = utterance.split("_")
        path = lay.audio(f"{folder}/audio/{speaker}/{book}/{utterance}.flac")
        lay.expect(f"MLS-{language.upper()}-{utterance}", path, "real", proportion, "-", f"{language}-{speaker}", language)


def _make_libritts(lay: Layout, prefix: str, label: str, attack: str) -> None:
    for subset, proportion, utterance in [("train-clean-100", "train", "103_1241_000000_000001"),
                                          ("dev-other", "valid", "116_288045_000003_000000"),
                                          ("test-clean", "test", "1089_134686_000001_000001")]:
        speaker, chapter = utterance.split("_")[:2]
        folder = f"{subset}/{speaker}/{chapter}"
        lay.text(f"{folder}/{utterance}.normalized.txt", "text")
        lay.text(f"{folder}/{speaker}_{chapter}.trans.tsv", "x\ty\tz\n")
        lay.expect(f"{prefix}-{utterance}", lay.audio(f"{folder}/{utterance}.wav", 24000), label, proportion,
                   attack, speaker, "en")


def make_libritts(lay: Layout) -> None:
    _make_libritts(lay, "Libri", "real", "-")


def make_libritts_r(lay: Layout) -> None:
    _make_libritts(lay, "Libri-R", "fake", "miipher")


def _make_fleurs(lay: Layout, prefix: str, label: str, attack: str) -> None:
    for locale, code, split, proportion, name in [("en_us", "EN", "train", "train", "10004088536354799741.wav"),
                                                  ("en_us", "EN", "dev", "valid", "1001.wav"),
                                                  ("cmn_hans_cn", "CN", "test", "test", "2002.wav")]:
        lay.text(f"data/{locale}/{split}.tsv", f"1683\t{name}\tRaw text.\traw text\tr a w\t16000\tFEMALE\n")
        path = lay.audio(f"data/{locale}/audio/{split}/{name}")
        lay.expect(f"{prefix}-{code}-{Path(name).stem}", path, label, proportion, attack, "-", locale.split("_")[0])


def make_fleurs(lay: Layout) -> None:
    _make_fleurs(lay, "FLEURS", "real", "-")


def make_fleurs_r(lay: Layout) -> None:
    _make_fleurs(lay, "FLEURS-R", "fake", "miipher")


def make_voxceleb2(lay: Layout) -> None:
    for video, clip in [("21Uxsk56VDQ", "00001"), ("21Uxsk56VDQ", "00002"), ("9Zdfx0bGsyE", "00001")]:
        lay.expect(f"VoxCeleb2-id00012-{video}-{clip}", lay.audio(f"dev/aac/id00012/{video}/{clip}.wav"), "real",
                   speaker="id00012")
    lay.audio("test/aac/id00017/01dfn2spqyE/00002.wav")  # AD uses the dev set only: no row for the test set


def make_wavefake(lay: Layout) -> None:
    for generator, stem, language, speaker in [("ljspeech_melgan", "LJ001-0001_gen", "en", "LJ"),
                                               ("jsut_parallel_wavegan", "BASIC5000_0001_gen", "ja", "JSUT"),
                                               ("common_voices_prompts_from_conformer_fastspeech2_pwg_ljspeech",
                                                "common_voice_en_1_gen", "en", "LJ")]:
        path = lay.audio(f"generated_audio/{generator}/{stem}.wav", 22050)
        lay.expect(f"WF-{generator}_{stem}", path, "fake", "-", generator, speaker, language)


def make_mlaad(lay: Layout) -> None:
    folder = "fake/de/tts_models_de_thorsten_vits"
    lay.text(f"{folder}/meta.csv", "path|original_file|language|model_name|transcript\n"
                                   f"./{folder}/a_1.wav|m-ailabs/x.wav|German|vits|Hallo\n")
    lay.expect("MLAAD-de-tts_models_de_thorsten_vits-a_1", lay.audio(f"{folder}/a_1.wav"), "fake",
               attack="tts_models_de_thorsten_vits", language="de")
    lay.expect("MLAAD-en-bark-b_2", lay.audio("fake/en/bark/b_2.wav", 24000), "fake", attack="bark", language="en")
    lay.expect("MLAAD-ZH-tts_models_zh-CN_baker_tacotron2-DDC-GST-c_3",
               lay.audio("fake/zh-cn/tts_models_zh-CN_baker_tacotron2-DDC-GST/c_3.wav"), "fake",
               attack="tts_models_zh-CN_baker_tacotron2-DDC-GST", language="zh-cn")


def make_spoofceleb(lay: Layout) -> None:
    rows = {"train": [("a00/id10318/YYsxcZ5saac-00002-006.flac", "id10318", "a00"),
                      ("a01/id10318/YYsxcZ5saac-00002-007.flac", "id10318", "a01")],
            "development": [("a06/id10326/NKOA_Q89wDM-00066-003.flac", "id10326", "a06")]}
    for split, records in rows.items():
        lay.text(f"metadata/{split}.csv", "file,speaker,attack\n" + "".join(f"{f},{s},{a}\n" for f, s, a in records))
        for relative, speaker, attack in records:
            row_id = f"SpoofCeleb-{relative.removesuffix('.flac')}"
            lay.expect(row_id, lay.audio(f"flac/{split}/{relative}"), "real" if attack == "a00" else "fake",
                       "train" if split == "train" else "valid", "-" if attack == "a00" else attack, speaker)


def make_codecfake(lay: Layout) -> None:
    # AD reads train, dev and C7 only (C1-C6 never become rows), and drops each label file's first row.
    lay.text("label/train.txt", "SSB00000001.wav real 0\nSSB13650058.wav real 0\nF01_SSB13650058.wav fake 1\n")
    lay.text("label/dev.txt", "F02_SSB00000002.wav fake 2\nSSB00000003.wav real 0\n")
    lay.text("label/C7.txt", "F07_p225_000.wav fake 7\nF07_p225_001.wav fake 7\n")
    lay.text("label/C1.txt", "F01_p225_002.wav fake 1\nF01_p225_003.wav fake 1\n")
    for dropped in ("train/SSB00000001.wav", "dev/F02_SSB00000002.wav", "C7/F07_p225_000.wav",
                    "C1/F01_p225_002.wav", "C1/F01_p225_003.wav"):
        lay.audio(dropped)
    lay.expect("Codecf-SSB13650058", lay.audio("train/SSB13650058.wav"), "real", "train")
    lay.expect("Codecf-F01_SSB13650058", lay.audio("train/F01_SSB13650058.wav"), "fake", "train", "F01")
    lay.expect("Codecf-SSB00000003", lay.audio("dev/SSB00000003.wav"), "real", "valid")
    lay.expect("Codecf-F07_p225_001", lay.audio("C7/F07_p225_001.wav"), "fake", "test", "F07")


def make_in_the_wild(lay: Layout) -> None:
    lay.text("meta.csv", "file,speaker,label\n0.wav,Alec Guinness,spoof\n1.wav,Barack Obama,bona-fide\n")
    lay.expect("ItW-0", lay.audio("0.wav"), "fake", speaker="Alec Guinness", language="en")
    lay.expect("ItW-1", lay.audio("1.wav"), "real", speaker="Barack Obama", language="en")


def make_fakeorreal(lay: Layout) -> None:  # the root is one version folder (AD: for-original)
    for split, label, name, proportion in [("training", "real", "file1.wav", "train"),
                                           ("testing", "fake", "file2.wav", "test"),
                                           ("validation", "fake", "file3.mp3", "valid")]:
        path = lay.audio(f"{split}/{label}/{name}")
        lay.expect(f"FoR-{split}-{label}-{Path(name).stem}", path, label, proportion, language="en")


def make_add2023(lay: Layout) -> None:  # the root is Track1.2/testR2, the set AD evaluates
    lines = []
    for name, word in [("ADD2023_T1.2R2_E_00000003", "genuine"), ("ADD2023_T1.2R2_E_00000004", "fake")]:
        lay.expect(f"ADD2023-{name}.wav", lay.audio(f"wav/{name}.wav"), "real" if word == "genuine" else "fake",
                   "test", language="zh")
        lines.append(f"{name}.wav {word}\n")
    lay.text("label.txt", "".join(lines))


def make_deep_voice(lay: Layout) -> None:  # AD's logged segments of the recordings
    for n in (1, 2):
        lay.expect(f"DeepVoice-VC_biden-original_seg_{n}", lay.audio(f"AUDIO_SEGMENTS/REAL/biden-original_seg_{n}.wav",
                   44100), "real", speaker="biden", language="en")
    lay.expect("DeepVoice-VC_biden-to-linus_seg_1", lay.audio("AUDIO_SEGMENTS/FAKE/biden-to-linus_seg_1.wav", 44100),
               "fake", attack="rvc", speaker="linus", language="en")


MAKERS = {name.removeprefix("make_"): maker for name, maker in globals().items() if name.startswith("make_")}


def test_every_recipe_has_a_miniature():
    assert set(MAKERS) <= set(RECIPES)  # the newer recipes' miniatures are in test_recipes_more.py
    assert len(RECIPES) >= 18


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_recipe_writes_the_expected_protocol(name, tmp_path):
    lay, rows = prepare_miniature(name, MAKERS[name], tmp_path)
    for row_id, expected in lay.expected.items():
        row = rows[row_id]
        assert row.path.startswith("$ROOT/")
        assert row.resolved_path(lay.root).resolve() == expected["path"].resolve()
        assert row.corpus == get_recipe(name).prefix.split("-")[0]  # AD groups per corpus by the first part
        info = sf.info(str(expected["path"])) if expected["path"].suffix != ".m4a" else None
        if info is not None:
            assert row.sample_rate_hz == info.samplerate
            assert row.duration_s == pytest.approx(lay.durations[expected["path"]], abs=1e-5)
        else:  # AAC adds encoder priming; the header (ffprobe) still gives about the written length
            assert row.sample_rate_hz == 16000 and 0.08 < row.duration_s < 0.2


def prepare_miniature(name, make, tmp_path):
    """Run recipe ``name`` on its miniature layout; every expected row must come out with its label,
    split, attack, speaker and language. Returns the layout and the rows by id."""
    lay = Layout(tmp_path / "corpus")
    make(lay)
    out = tmp_path / "protocol.csv"
    result = prepare(name, lay.root, out, num_workers=2, progress=False)
    assert result.skipped == []
    rows = {row.id: row for row in read_protocol(out)}
    assert sorted(rows) == sorted(lay.expected)
    for row_id, expected in lay.expected.items():
        row = rows[row_id]
        assert (row.label, row.proportion, row.attack, row.speaker, row.language) == (
            expected["label"], expected["proportion"], expected["attack"], expected["speaker"], expected["language"]
        ), row_id
    assert_rows_match_antideepfake(name, rows)
    return lay, rows


def assert_rows_match_antideepfake(name, rows):
    """Row for row, the rows AD's protocol script wrote for the same miniature: the same IDs, and per ID the
    same label, split, file, sample rate and duration (AD rounds it to 0.01 s). Attack, Speaker and Language
    are posttrain's own normalised metadata, and AD's encoding columns depend on its torchaudio backend."""
    folder = json.loads((AD_FIXTURES / "index.json").read_text(encoding="utf-8"))[name]["root"]
    with (AD_FIXTURES / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
        expected = list(csv.DictReader(handle))
    assert len({ad["ID"] for ad in expected}) == len(expected), f"{name}: AD's fixture repeats an ID"
    assert sorted(rows) == sorted(ad["ID"] for ad in expected)
    for ad in expected:
        row = rows[ad["ID"]]
        ours = (row.label, row.proportion, row.path.replace("$ROOT/", f"$ROOT/{folder}/", 1), row.sample_rate_hz,
                round(row.duration_s, 2))
        assert ours == (ad["Label"], ad["Proportion"], ad["Path"], int(ad["SampleRate"]), float(ad["Duration"])), ad["ID"]


def test_every_recipe_has_an_antideepfake_fixture():
    index = json.loads((AD_FIXTURES / "index.json").read_text(encoding="utf-8"))
    assert sorted(index) == sorted(RECIPES)
    assert all((AD_FIXTURES / f"{name}.csv").is_file() for name in index)


# ------------------------------------------------------------------------------------------------
# malformed layouts: one per recipe family, each error names the offending file (and line)


def _break_line(file: str, bad: str):
    def breaker(lay: Layout) -> str:
        path = lay.root / file
        path.write_text(path.read_text() + bad)
        return f"{path}:{len(path.read_text().splitlines())}"
    return breaker


def _add_file(relative: str, named: str | None = None):
    """Add a stray file; the error must name ``named`` (the file itself, or its unexpected folder)."""
    def breaker(lay: Layout) -> str:
        path = lay.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        return str(lay.root / (named or relative))
    return breaker


BREAKERS = {
    "asvspoof2019_la": _break_line("LA/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.dev.trl.txt",
                                   "LA_0069 LA_D_1 - bonafide\n"),
    "asvspoof2021_df": _break_line("keys/DF/CM/trial_metadata.txt",
                                   "LA_0023 DF_E_9 nocodec asvspoof A14 maybe notrim eval\n"),
    "asvspoof5": _break_line("ASVspoof5.train.tsv", "T_4850 T_0000000009 F - - - AC3 A05 spoof\n"),
    "mls": _break_line("mls_german/train/transcripts.txt", "1844-931-000009\tein satz\n"),
    "libritts": _add_file("train-clean-100/103/1241/103_1241_x.wav"),
    "fleurs": _break_line("data/en_us/dev.tsv", "1683\n"),
    "voxceleb2": _add_file("dev/aac/speaker12/abc/00001.wav", "dev/aac/speaker12"),
    "wavefake": _add_file("generated_audio/vctk_hifigan/p225_001.wav", "generated_audio/vctk_hifigan"),
    "mlaad": _break_line("fake/de/tts_models_de_thorsten_vits/meta.csv", "./x/absent.wav|o|German|vits|Hallo\n"),
    "spoofceleb": _break_line("metadata/train.csv", "a02/id1/x.flac,id1\n"),
    "codecfake": _break_line("label/train.txt", "F02_SSB1.wav fake two\n"),
    "in_the_wild": _break_line("meta.csv", "2.wav,Someone,deepfake\n"),
    "fakeorreal": _add_file("training/unknown/file9.wav", "training/unknown"),
    "add2023": _break_line("label.txt", "ADD2023_T1.2R2_E_00000009.wav spoofed\n"),
    "deep_voice": _add_file("AUDIO_SEGMENTS/FAKE/obama.wav"),
}


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_malformed_layout_names_the_file(name, tmp_path):
    assert_malformed_layout_is_named(name, MAKERS[name], BREAKERS[name], tmp_path)


def assert_malformed_layout_is_named(name, make, breaks, tmp_path):
    """Build the miniature, break it, and expect an error naming the file (and the line, for protocols)."""
    lay = Layout(tmp_path / name)
    make(lay)
    where = breaks(lay)
    with pytest.raises(RecipeError) as error:
        build_rows(get_recipe(name), lay.root, progress=False)
    assert where.split(":")[0] in str(error.value)
    if ":" in where:  # a protocol line: the line number is named too
        assert where in str(error.value)


def test_prepare_names_what_it_leaves_out_as_antideepfake(tmp_path, capsys):
    from posttrain.cli import main

    lay = Layout(tmp_path / "codecfake")
    make_codecfake(lay)
    assert main(["data", "prepare", "codecfake", "--root", str(lay.root), "--out", str(tmp_path / "c.csv"),
                 "--no-progress"]) == 0
    assert "note: only train, dev and C7, each without its first row" in capsys.readouterr().out


def test_voxceleb2_reads_m4a_headers_with_ffprobe(tmp_path):
    lay = Layout(tmp_path / "vox")
    path = lay.audio("dev/aac/id00012/21Uxsk56VDQ/00001.m4a")
    (row,) = build_rows(get_recipe("voxceleb2"), lay.root, progress=False).rows
    assert row.id == "VoxCeleb2-id00012-21Uxsk56VDQ-00001" and row.resolved_path(lay.root) == path
    assert row.sample_rate_hz == 16000 and 0.08 < row.duration_s < 0.2  # AAC adds encoder priming


def test_missing_and_corrupt_audio_fail_or_are_skipped_and_counted(tmp_path):
    lay = Layout(tmp_path / "itw")
    make_in_the_wild(lay)
    lay.text("meta.csv", (lay.root / "meta.csv").read_text() + "2.wav,Someone,spoof\n3.wav,Someone,spoof\n")
    (lay.root / "3.wav").write_bytes(b"RIFF....not audio")
    with pytest.raises(RecipeError, match=r"2\.wav: missing \(listed at .*meta\.csv:4\)"):
        build_rows(get_recipe("in_the_wild"), lay.root, progress=False)
    result = build_rows(get_recipe("in_the_wild"), lay.root, skip_missing=True, progress=False)
    assert sorted(row.id for row in result.rows) == ["ItW-0", "ItW-1"]
    assert len(result.skipped) == 2
    assert "2.wav: missing" in result.skipped[0] and "3.wav: unreadable" in result.skipped[1]
    assert [(Path(r["path"]).name, r["reason"]) for r in result.rejects] == [("2.wav", "missing"), ("3.wav", "unreadable")]
    assert result.rejects[0]["listed_at"].endswith("meta.csv:4")


def test_prepare_skips_a_rate_out_of_range_and_a_lying_header_into_rejects_jsonl(tmp_path, capsys):
    """``data prepare --skip-missing`` leaves out (and counts, one JSON line each) a WAV claiming
    2,147,483,647 Hz and a WAV whose data chunk hides two thirds of its samples (its Duration would lie)."""
    from posttrain.bench.hostile_audio import wav_header, wav_with_rate
    from posttrain.cli import main

    lay = Layout(tmp_path / "itw")
    make_in_the_wild(lay)
    lay.text("meta.csv", (lay.root / "meta.csv").read_text() + "2.wav,Someone,spoof\n3.wav,Someone,spoof\n")
    (lay.root / "2.wav").write_bytes(wav_with_rate(2_147_483_647, 48))
    (lay.root / "3.wav").write_bytes(wav_header(16000, 3200) + b"\x01\x02" * 4800)
    out = tmp_path / "itw.csv"
    assert main(["data", "prepare", "in_the_wild", "--root", str(lay.root), "--out", str(out), "--skip-missing",
                 "--no-progress"]) == 0
    assert [row.id for row in read_protocol(out)] == ["ItW-0", "ItW-1"]
    rejects = [json.loads(line) for line in (tmp_path / "itw.rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["path"]).name, r["reason"]) for r in rejects] == [("2.wav", "rate_out_of_range"),
                                                                      ("3.wav", "length_mismatch")]
    assert "2,147,483,647 Hz" in rejects[0]["detail"] and rejects[1]["listed_at"].endswith("meta.csv:5")
    assert "rate_out_of_range 1, length_mismatch 1" in capsys.readouterr().err


def test_duplicate_ids_and_unknown_recipe_are_errors(tmp_path):
    lay = Layout(tmp_path / "asv")
    make_asvspoof2019_la(lay)
    protocol = lay.root / "LA/ASVspoof2019_LA_cm_protocols/ASVspoof2019.LA.cm.train.trn.txt"
    protocol.write_text(protocol.read_text() + "LA_0079 LA_T_1138215 - - bonafide\n")
    with pytest.raises(RecipeError, match=r"trn\.txt:3: duplicate ID 'LA_T_1138215'"):
        build_rows(get_recipe("asvspoof2019_la"), lay.root, progress=False)
    with pytest.raises(RecipeError, match="unknown corpus recipe 'asvspoof2077'"):
        get_recipe("asvspoof2077")


def test_cli_prepare(tmp_path, capsys):
    from posttrain.cli import main

    lay = Layout(tmp_path / "dv")
    make_deep_voice(lay)
    out = tmp_path / "dv.csv"
    assert main(["data", "prepare", "deep_voice", "--root", str(lay.root), "--out", str(out), "--no-progress"]) == 0
    assert len(read_protocol(out)) == 3
    assert "3 rows" in capsys.readouterr().out
    assert main(["data", "prepare", "deep_voice", "--root", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "corpus root is not a folder" in capsys.readouterr().err


def test_deepvoice_segments_are_cut_at_ads_logged_bounds(tmp_path, capsys):
    from posttrain.cli import main

    root = tmp_path / "DeepVoice"
    lay = Layout(root)
    recording = lay.audio("AUDIO/REAL/biden-original.wav", 16000)
    samples, _ = sf.read(str(recording), dtype="float32")
    log = tmp_path / "DeepVoice_seg_log.txt"
    log.write_text(f"Audio: biden-original_seg_1, start at: 0, end at: 700\nSaved: /x/REAL/biden-original_seg_1.wav\n"
                   f"Audio: biden-original_seg_2, start at: 500, end at: {len(samples) + 999}\n"
                   "Audio: obama-to-biden_seg_1, start at: 0, end at: 10\nProcessing complete!\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="cut them"):
        build_rows(get_recipe("deep_voice"), root, progress=False)
    assert main(["data", "deepvoice-segments", "--log", str(tmp_path / "absent.txt"), "--root", str(root)]) == 2
    assert "absent.txt" in capsys.readouterr().err  # one line naming the missing log
    assert main(["data", "deepvoice-segments", "--log", str(log), "--root", str(root)]) == 0
    assert "obama-to-biden.wav" in capsys.readouterr().err  # a recording the log names but the folder lacks
    for name, expected in [("biden-original_seg_1", samples[:700]), ("biden-original_seg_2", samples[500:])]:
        piece, _ = sf.read(str(root / "AUDIO_SEGMENTS" / "REAL" / f"{name}.wav"), dtype="float32")
        np.testing.assert_array_equal(piece, expected)
    (root / "AUDIO_SEGMENTS" / "FAKE").mkdir()
    rows = build_rows(get_recipe("deep_voice"), root, progress=False).rows
    assert sorted(row.id for row in rows) == ["DeepVoice-VC_biden-original_seg_1", "DeepVoice-VC_biden-original_seg_2"]
