"""The recipes completing the AntiDeepfake mix, on miniature copies of each layout (real audio files).

The ``Layout`` builder and the breakers come from test_recipes.py; every file here is written by the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
from test_recipes import MAKERS as FIRST_MAKERS
from test_recipes import Layout, _add_file, _break_line, assert_malformed_layout_is_named, prepare_miniature

from posttrain.data.recipes import RECIPES, RecipeError, get_recipe
from posttrain.data.recipes.base import build_rows


def make_aishell3(lay: Layout) -> None:
    lay.text("train/content.txt", "SSB00050001.wav 广 guang3\n")
    lay.text("train/label_train-set.txt", "# header\n")
    lay.text("train/prosody/prosody.txt", "x\n")
    lay.expect("AIShell3-SSB0005-SSB00050001", lay.audio("train/wav/SSB0005/SSB00050001.wav", 44100), "real",
               "train", speaker="SSB0005", language="zh")
    lay.expect("AIShell3-SSB1831-SSB18310007", lay.audio("test/wav/SSB1831/SSB18310007.wav", 44100), "real",
               "test", speaker="SSB1831", language="zh")


def make_cnceleb2(lay: Layout) -> None:
    for speaker, name in [("id10936", "recitation-02-028"), ("id11000", "live_broadcast-01-001")]:
        path = lay.audio(f"CN-Celeb2_flac/data/{speaker}/{name}.flac")
        lay.expect(f"CNCeleb2-{speaker}-{name}", path, "real", speaker=speaker, language="zh")


def make_ljspeech(lay: Layout) -> None:
    lay.text("LJSpeech-1.1/metadata.csv", "LJ001-0001|Printing, in the only sense|Printing, in the only sense\n"
                                          "LJ050-0278|the recommendations|the recommendations\n")
    lay.text("LJSpeech-1.1/README", "LJ Speech Dataset\n")
    for utterance in ("LJ001-0001", "LJ050-0278"):
        lay.expect(f"LJ-{utterance}", lay.audio(f"LJSpeech-1.1/wavs/{utterance}.wav", 22050), "real", speaker="LJ",
                   language="en")


def make_voxceleb2_vocoded(lay: Layout) -> None:
    for vocoder, split, proportion, speaker, video, clip in [
            ("hifigan", "dev", "train", "id00012", "21Uxsk56VDQ", "00001"),
            ("hn_sinc_nsf", "test", "test", "id00017", "01dfn2spqyE", "00002")]:
        path = lay.audio(f"{vocoder}/{split}/aac/{speaker}/{video}/{clip}.wav")
        lay.expect(f"VoxCeleb2-Vo-{vocoder}-{speaker}-{video}-{clip}", path, "fake", "-", vocoder, speaker)


def make_libritts_vocoded(lay: Layout) -> None:
    for vocoder, subset, proportion, utterance in [
            ("hifigan", "train-clean-100", "train", "103_1241_000000_000001"),
            ("waveglow", "dev-clean", "valid", "84_121123_000008_000000"),
            ("hn_sinc_nsf_hifi", "test-other", "test", "1688_142285_000000_000000")]:
        speaker, chapter = utterance.split("_")[:2]
        path = lay.audio(f"{vocoder}/{subset}/{speaker}/{chapter}/{utterance}.wav", 24000)
        lay.expect(f"LibriTTS-Vo-{vocoder}-{utterance}", path, "fake", proportion, vocoder, speaker, "en")


def make_cvoicefake(lay: Layout) -> None:
    for lang, folder, stem, label, attack, language in [
            ("EN", "Bonafide", "common_voice_en_36752138", "real", "-", "en"),
            ("EN", "vctk_parallel_wavegan.v1_generated", "common_voice_en_36752138_Gen", "fake",
             "vctk_parallel_wavegan.v1", "en"),
            ("CN", "griffin_lim_generated", "common_voice_zh-CN_18531536_Gen", "fake", "griffin_lim", "zh")]:
        path = lay.audio(f"CVoiceFake_Large/{lang}/{folder}/{stem}.mp3", 24000)
        lay.expect(f"CVoice-{lang}-{folder}-{stem}", path, label, attack=attack, language=language)


def make_codecfake_vctk(lay: Layout) -> None:
    for codec, utterance, speaker in [("encodec_24khz", "p272_103", "p272"),
                                      ("speech_tokenizer_16k", "s5_001_mic1", "s5")]:
        path = lay.audio(f"processed/{codec}+{utterance}.wav")
        lay.expect(f"CodecF-{codec}+{utterance}", path, "fake", attack=codec, speaker=speaker, language="en")


def make_diffuse_or_confuse(lay: Layout) -> None:
    for system, stem, speaker in [("tacotron2-DCA_wavegrad", "LJ044-0144", "LJ"),
                                  ("DiffGAN-TTS_aux", "LJ001-0001", "LJ"), ("ProDiff", "sample_7", "-")]:
        path = lay.audio(f"{system}/{stem}.wav", 22050)
        lay.expect(f"DiffFake-{system}-{stem}", path, "fake", attack=system, speaker=speaker, language="en")


def make_diffssd(lay: Layout) -> None:
    lay.text("README.md", "DiffSSD\n")
    lay.expect("DiffSSD-grad_tts---EN-sentence_1", lay.audio("generated_speech/grad_tts/sentence_1.wav", 22050), "fake",
               attack="grad_tts", language="en")
    lay.expect("DiffSSD-your_tts-speaker_1487-EN-sentence_449",
               lay.audio("generated_speech/your_tts/speaker_1487/sentence_449.wav"), "fake", attack="your_tts",
               speaker="speaker_1487", language="en")


def make_cfad(lay: Layout) -> None:
    for relative, label, proportion, attack in [
            ("clean_version/train_clean/real_clean/aishell3/SSB00050001.wav", "real", "train", "-"),
            ("codec_version/test_seen_codec/fake_codec/lpcnet/SSB09660003_lpcnet_m4a.wav", "fake", "test", "lpcnet"),
            ("codec_version/test_unseen_codec/fake_codec/lpcnet/SSB09660004_lpcnet_mp3.wav", "fake", "test", "lpcnet"),
            ("noisy_version/dev_noise/fake_noise/hifigan/BAC009S0002W0122_hifigan.wav", "fake", "valid", "hifigan")]:
        version, *_, stem = relative.removesuffix(".wav").split("/")
        row_id = f"CFAD-{version}-{proportion}-{label}-{stem}"
        lay.expect(row_id, lay.audio(f"CFAD/{relative}"), label, proportion, attack, language="zh")


def make_dfadd(lay: Layout) -> None:
    for folder, split, proportion, name, label, attack, speaker in [
            ("DATASET_VCTK_BONAFIDE", "train", "train", "p225_001_mic1.flac", "real", "-", "p225"),
            ("DATASET_PflowTTS", "test", "test", "p345_251_pflow.wav", "fake", "PflowTTS", "p345"),
            ("DATASET_MatchaTTS", "valid", "valid", "p226_002_matcha.wav", "fake", "MatchaTTS", "p226")]:
        path = lay.audio(f"{folder}/{split}/{name}")
        lay.expect(f"DFADD-{folder}-{name.rsplit('.', 1)[0]}", path, label, proportion, attack, speaker, "en")


DSD_HEADER = ("Utterence name (file name),TTS or VC,Is multi-speaker?,Language,Noise type 1,Source link,utt,group,"
              "Speaker name,Gender,Age,label,Model,subset,duration\n")


def make_dsd(lay: Layout) -> None:
    # AD's script skips the first record after the header: its file exists but gets no row.
    lay.audio("p225_001_gen.wav")
    rows = [("p225_001_gen", "VC", "English", "FreeVC-VCTK", "p225", "spoof", "FreeVC", "train"),
            ("09MKIS0040_12815", "-", "Korean", "AIHUB", "09MKIS0040", "bonafide", "-", "train"),
            ("12MWKH0048_000026", "TTS", "Korean", "VITS-AIHUB", "12MWKH0048", "spoof", "VITS", "eval"),
            ("p225_007_gen", "VC", "English", "FreeVC-VCTK", "p225", "spoof", "FreeVC", "dev")]
    lay.text("DSD_corpus_v1.csv", DSD_HEADER + "".join(
        f"{name}.wav,{kind},No,{language},-,-,{name},{group},{speaker},Male,Adult,{label},{model},{subset},1.5\n"
        for name, kind, language, group, speaker, label, model, subset in rows))
    for name, _, language, _, speaker, label, model, subset in rows[1:]:
        lay.expect(f"DSD-{name}", lay.audio(f"{name}.wav"), "real" if label == "bonafide" else "fake",
                   {"train": "train", "dev": "valid", "eval": "test"}[subset], model, speaker,
                   {"Korean": "ko", "English": "en"}[language])


DECRO_RELEASE = "petrichorwq-DECRO-dataset-6fc9884"


def make_decro(lay: Layout) -> None:
    lay.text(f"{DECRO_RELEASE}/ch_dev.txt",
             "unknown 20032123 - baidu spoof\nG0019 T0055G0019S0420 - aidatatang bonafide\n")
    lay.text(f"{DECRO_RELEASE}/en_train.txt", "p225 p225_001 - vctk bonafide\n")
    for set_name, name, label, proportion, attack, speaker, language in [
            ("ch_dev", "20032123", "fake", "valid", "baidu", "-", "zh"),
            ("ch_dev", "T0055G0019S0420", "real", "valid", "-", "G0019", "zh"),
            ("en_train", "p225_001", "real", "train", "-", "p225", "en")]:
        path = lay.audio(f"{DECRO_RELEASE}/{set_name}/{name}.wav")
        lay.expect(f"DECRO-{proportion}-{language.upper()}-{name}", path, label, proportion, attack, speaker, language)


def make_habla(lay: Layout) -> None:
    base = "FinalDataset_16khz"
    lay.expect("HABLA-real-clf_07508_00799857148",
               lay.audio(f"{base}/Real/Chile/clf_07508/clf_07508_00799857148.wav"), "real", speaker="clf_07508",
               language="es")
    stem = "CycleGAN-vem_02484_00993837010-arm_01523_020267"
    lay.expect(f"HABLA-fake-{stem}",
               lay.audio(f"{base}/CycleGAN/Venezuela-Argentina/vem_02484-arm_01523/{stem}.wav"), "fake",
               attack="CycleGAN", speaker="arm_01523", language="es")


def make_voicemos(lay: Layout) -> None:
    base = "main/blizzard"
    lay.text(f"{base}/blizzard_wavs_and_scores_2008_release_version_1/test_results/scores.txt", "A 4.8\n")
    lay.text(f"{base}/blizzard_wavs_and_scores_2008_release_version_1/A/README.txt", "natural speech\n")
    made = []
    for release, system, inner, label, attack, language in [
            ("2008", "A", "submission_directory/english/full/2008/news/wavs/news_2008_0001", "real", "-", "en"),
            ("2010", "N", "submission_directory/mandarin/MH1/2010/news/wavs/news_2010_0095", "fake", "2010-N", "zh"),
            ("2010", "B", "wavs/conv_2010_0003", "fake", "2010-B", "-"),
            ("2010", "N", "wavs/conv_2010_0003", "fake", "2010-N", "-"),  # the same name in another system
            ("2010", "B", "wavs", "fake", "2010-B", "-")]:  # B/wavs.wav sorts before B/wavs/... as a string
        relative = f"{base}/blizzard_wavs_and_scores_{release}_release_version_1/{system}/{inner}.wav"
        made.append((relative, lay.audio(relative), label, attack, language))
    # AD numbers the files in the sorted order of their path strings
    for number, (relative, path, label, attack, language) in enumerate(sorted(made)):
        lay.expect(f"VoiceMOS-{number}-{Path(relative).stem}", path, label, attack=attack, language=language)


MAKERS = {name.removeprefix("make_"): maker for name, maker in globals().items() if name.startswith("make_")}


def test_every_recipe_has_a_miniature_here_or_in_test_recipes():
    assert not set(MAKERS) & set(FIRST_MAKERS)
    assert sorted({*MAKERS, *FIRST_MAKERS}) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_recipe_writes_the_expected_protocol(name, tmp_path):
    lay, rows = prepare_miniature(name, MAKERS[name], tmp_path)
    for row_id, expected in lay.expected.items():
        row = rows[row_id]
        assert row.resolved_path(lay.root).resolve() == expected["path"].resolve()
        assert row.corpus == get_recipe(name).prefix.split("-")[0]
        assert row.sample_rate_hz == sf.info(str(expected["path"])).samplerate
        assert row.duration_s == pytest.approx(lay.durations[expected["path"]], abs=1e-5)


BREAKERS = {
    "aishell3": _add_file("train/wav/SSB0005/SSB18310001.wav"),
    "cnceleb2": _add_file("CN-Celeb2_flac/data/id10936/notes.txt"),
    "ljspeech": _break_line("LJSpeech-1.1/metadata.csv", "LJ1-2|text|text\n"),
    "voxceleb2_vocoded": _add_file("hifigan/dev/aac/speaker12/abc/00001.wav", "hifigan/dev/aac/speaker12"),
    "libritts_vocoded": _add_file("103_1241_000000_000001.wav"),
    "cvoicefake": _add_file("CVoiceFake_Large/EN/unknown/x.mp3", "CVoiceFake_Large/EN/unknown"),
    "codecfake_vctk": _add_file("processed/p225_001.wav"),
    "diffuse_or_confuse": _add_file("ProDiff/meta.json"),
    "diffssd": _add_file("real_speech/LJ001-0001.wav", "real_speech"),
    "cfad": _add_file("CFAD/clean_version/validation_clean/real_clean/a/x.wav", "CFAD/clean_version/validation_clean"),
    "dfadd": _add_file("DATASET_GradTTS/train/001.wav"),
    "dsd": _break_line("DSD_corpus_v1.csv", "x.wav,TTS,No,Klingon,-,-,x,g,s,Male,Adult,spoof,VITS,train,1.0\n"),
    "decro": _break_line(f"{DECRO_RELEASE}/en_train.txt", "p225 p225_002 - vctk genuine\n"),
    "habla": _add_file("FinalDataset_16khz/Real/Chile/clf_07508/notes.txt"),
    "voicemos": _add_file("main/blizzard/blizzard_wavs_and_scores_2008_release_version_1/stray.wav"),
}


def test_every_new_recipe_has_a_malformed_layout():
    assert sorted(BREAKERS) == sorted(MAKERS)


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_malformed_layout_names_the_file(name, tmp_path):
    assert_malformed_layout_is_named(name, MAKERS[name], BREAKERS[name], tmp_path)


def test_ljspeech_names_an_utterance_without_audio(tmp_path):
    lay = Layout(tmp_path / "lj")
    make_ljspeech(lay)
    (lay.root / "LJSpeech-1.1/wavs/LJ050-0278.wav").unlink()
    with pytest.raises(RecipeError, match=r"LJ050-0278\.wav: missing \(listed at .*metadata\.csv:2\)"):
        build_rows(get_recipe("ljspeech"), lay.root, progress=False)


@pytest.mark.parametrize("name, misplaced", [
    ("cfad", "CFAD/clean_version/train_clean/real_clean/SSB00050002.wav"),
    ("habla", "FinalDataset_16khz/CycleGAN/Venezuela-Argentina/x.wav"),
])
def test_audio_one_folder_too_high_is_named_not_dropped(name, misplaced, tmp_path):
    lay = Layout(tmp_path / name)
    MAKERS[name](lay)
    lay.audio(misplaced)
    with pytest.raises(RecipeError, match="audio file outside a .* folder") as error:
        build_rows(get_recipe(name), lay.root, progress=False)
    assert str(lay.root / misplaced) in str(error.value)
