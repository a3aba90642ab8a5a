"""The demo corpus: real letter/syllable recordings (klettres-data) vs espeak-ng speech of the same texts.

Genuine: Debian's ``klettres-data`` (``/usr/share/klettres/<lang>/sounds.xml`` lists, per language,
``<sound name="TEXT" file="<lang>/{alpha,syllab}/<name>.ogg"/>``: human recordings of letters and
syllables, Ogg Vorbis, mostly 44.1 kHz, some stereo). Synthetic: ``espeak-ng`` reading the same texts
with one of several voice variants / speeds / pitches per text (the Attack column).

Both classes go through one chain, so neither file format, sample rate, level nor leading silence
gives the label away:

1. decode to float32 and average the channels (``posttrain.data.audio``);
2. synthetic only -- espeak-ng writes raw 22.05 kHz PCM that never met a codec, while every klettres
   file is lossy Vorbis: resample it to 44.1 kHz (the klettres rate) and round-trip it through the
   same Vorbis encoder (libsndfile OGG/VORBIS), so both classes carry one generation of Vorbis;
3. resample from the native rate to 16 kHz with the same torchaudio resampler;
4. trim leading/trailing silence: 20 ms frames, keep first..last frame within ``TRIM_DB`` of the
   loudest frame, plus ``TRIM_PAD_S`` either side;
5. normalise the RMS level to ``TARGET_RMS_DBFS``, then scale down if the peak exceeds ``PEAK_LIMIT``;
6. 16 kHz mono FLAC, PCM_16.

Splits are by text: the (language, text) pairs of each language are shuffled with the seed and cut
60/20/20, so a text -- and both its recordings -- lives in exactly one split, every split holds both
labels and every language. IDs: ``KLETTRES-<lang>-<alpha|syllab>-<name>`` for the recording,
``ESPEAK-...`` with the same tail for its synthetic twin. CSV paths are ``$ROOT/audio/...`` with the
output folder as root.
"""

from __future__ import annotations

import io
import random
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from posttrain.config import SAMPLE_RATE_HZ
from posttrain.data import audio
from posttrain.data.resample import resample
from posttrain.data.files import write_bytes_atomic
from posttrain.data.protocol import ROOT_PLACEHOLDER, ProtocolRow, write_protocol

KLETTRES_DIR = Path("/usr/share/klettres")
# klettres language folder -> espeak-ng voice (nds, and nn/id whose audio the package lacks, have none)
ESPEAK_VOICES = {"ar": "ar", "cs": "cs", "da": "da", "de": "de", "en": "en-us", "en_GB": "en-gb", "es": "es",
                 "fr": "fr-fr", "he": "he", "hu": "hu", "it": "it", "lt": "lt", "ml": "ml", "nb": "nb", "nl": "nl",
                 "pt_BR": "pt-br", "ru": "ru", "tn": "tn", "uk": "uk"}
DEFAULT_LANGUAGES = ("fr", "de", "en", "es", "it")
DEFAULT_MAX_PER_LANGUAGE = 60
SPLIT_FRACTIONS = (("train", 0.6), ("valid", 0.2), ("test", 0.2))

CODEC_RATE_HZ = 44_100
TRIM_DB = -35.0
TRIM_FRAME_S = 0.02
TRIM_PAD_S = 0.05
TARGET_RMS_DBFS = -23.0
PEAK_LIMIT = 0.89  # -1 dBFS


@dataclass(frozen=True)
class Attack:
    """An espeak-ng voice variant at a speed (words per minute) and pitch (0-99)."""

    variant: str
    speed_wpm: int
    pitch: int

    @property
    def name(self) -> str:
        return f"espeak-{self.variant}-s{self.speed_wpm}-p{self.pitch}"


# Slower than espeak's 175 wpm default, so synthetic letters last about as long as the recorded ones.
ATTACKS = (Attack("m3", 100, 50), Attack("f2", 115, 70), Attack("klatt", 130, 40), Attack("m1", 110, 35),
           Attack("f4", 120, 60))


@dataclass(frozen=True)
class Recording:
    language: str
    text: str
    path: Path

    @property
    def key(self) -> str:
        """``<lang>-<alpha|syllab>-<name>``: unique per recording, shared by its synthetic twin."""
        return f"{self.language}-{self.path.parent.name}-{self.path.stem}"


@dataclass
class DemoResult:
    rows: list[ProtocolRow]
    csv_paths: dict[str, Path]
    missing: list[str]  # sounds.xml entries whose audio the package does not ship
    rejected: list[str]  # "id: reason" for audio that failed the chain (e.g. silent synthesis)


# ------------------------------------------------------------------------------------------------
# the shared processing chain


def trim_silence(samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    frame = int(TRIM_FRAME_S * sample_rate_hz)
    count = len(samples) // frame
    if count == 0:
        raise audio.AudioError("empty", f"{len(samples)} samples: shorter than one {TRIM_FRAME_S} s frame")
    energy = np.sqrt(np.mean(samples[: count * frame].reshape(count, frame) ** 2, axis=1))
    if energy.max() <= 1e-6:
        raise audio.AudioError("empty", "silent audio")
    active = np.flatnonzero(energy >= energy.max() * 10 ** (TRIM_DB / 20))
    pad = int(TRIM_PAD_S * sample_rate_hz)
    return samples[max(0, active[0] * frame - pad): min(len(samples), (active[-1] + 1) * frame + pad)]


def normalise_level(samples: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))
    scaled = samples * (10 ** (TARGET_RMS_DBFS / 20) / rms)
    peak = float(np.abs(scaled).max())
    return (scaled * (PEAK_LIMIT / peak) if peak > PEAK_LIMIT else scaled).astype(np.float32)


def finish(samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    """Steps 3-5 of the chain: 16 kHz, trimmed, level-normalised mono float32."""
    resampled = resample(samples, sample_rate_hz, SAMPLE_RATE_HZ)
    return normalise_level(trim_silence(resampled, SAMPLE_RATE_HZ))


def vorbis_roundtrip(samples: np.ndarray, sample_rate_hz: int) -> np.ndarray:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate_hz, format="OGG", subtype="VORBIS")
    decoded, _ = audio.decode(buffer.getvalue())
    return audio.to_mono(decoded)[: len(samples)]


def genuine_waveform(path: Path) -> np.ndarray:
    samples, rate = audio.decode(path)
    return finish(audio.to_mono(samples), rate)


def synthesize(text: str, voice: str, attack: Attack) -> bytes:
    """espeak-ng's WAV bytes for ``text`` (lower-cased: capitals make espeak spell or stress oddly)."""
    result = subprocess.run(["espeak-ng", "-v", f"{voice}+{attack.variant}", "-s", str(attack.speed_wpm),
                             "-p", str(attack.pitch), "--stdout", text.lower()], capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng failed for {text!r} ({voice}): {result.stderr.decode(errors='replace')}")
    return result.stdout


def synthetic_waveform(text: str, voice: str, attack: Attack) -> np.ndarray:
    samples, rate = audio.decode(synthesize(text, voice, attack))
    at_codec_rate = resample(audio.to_mono(samples), rate, CODEC_RATE_HZ)
    return finish(vorbis_roundtrip(at_codec_rate, CODEC_RATE_HZ), CODEC_RATE_HZ)


# ------------------------------------------------------------------------------------------------
# corpus listing, sampling and splits


def list_recordings(klettres_dir: Path, language: str) -> tuple[list[Recording], list[str]]:
    """The recordings ``sounds.xml`` lists for a language, and the listed files that are absent."""
    sounds_xml = klettres_dir / language / "sounds.xml"
    if not sounds_xml.is_file():
        raise FileNotFoundError(f"{sounds_xml}: no klettres sounds for language {language!r}")
    recordings, missing = [], []
    for sound in ET.parse(sounds_xml).getroot().iter("sound"):
        text, file = sound.get("name"), sound.get("file")
        if not text or not file:
            raise ValueError(f"{sounds_xml}: <sound> without name/file: {ET.tostring(sound, encoding='unicode')}")
        path = klettres_dir / file
        if path.is_file():
            recordings.append(Recording(language, text, path))
        else:
            missing.append(file)
    return recordings, missing


def assign_splits(recordings: list[Recording], seed: int) -> dict[tuple[str, str], str]:
    """(language, text) -> split; per language, shuffled with ``seed`` and cut 60/20/20."""
    texts_by_language: dict[str, list[str]] = defaultdict(list)
    for recording in recordings:
        if recording.text not in texts_by_language[recording.language]:
            texts_by_language[recording.language].append(recording.text)
    splits = {}
    for language, texts in sorted(texts_by_language.items()):
        order = sorted(texts)
        random.Random(f"{seed}-{language}").shuffle(order)
        # at least one text per split whenever there are three: every split gets every language
        valid = max(1, round(len(order) * SPLIT_FRACTIONS[1][1])) if len(order) >= 3 else 0
        test = max(1, round(len(order) * SPLIT_FRACTIONS[2][1])) if len(order) >= 3 else 0
        for index, text in enumerate(order):
            split = "test" if index < test else "valid" if index < test + valid else "train"
            splits[(language, text)] = split
    return splits


def select(recordings: list[Recording], max_per_language: int | None, seed: int) -> list[Recording]:
    if max_per_language is None or len(recordings) <= max_per_language:
        return recordings
    chosen = set(random.Random(f"{seed}-select-{recordings[0].language}").sample(range(len(recordings)),
                                                                                  max_per_language))
    return [recording for index, recording in enumerate(recordings) if index in chosen]


# ------------------------------------------------------------------------------------------------
# building


def _row(row_id: str, label: str, out: Path, samples: np.ndarray, attack: str, speaker: str, split: str,
         language: str) -> ProtocolRow:
    relative = Path("audio") / label / f"{row_id}.flac"
    write_bytes_atomic(out / relative, audio.encode_flac(samples))
    return ProtocolRow(id=row_id, label=label, duration_s=len(samples) / SAMPLE_RATE_HZ,
                       path=f"{ROOT_PLACEHOLDER}/{relative.as_posix()}", sample_rate_hz=SAMPLE_RATE_HZ,
                       attack=attack, speaker=speaker, proportion=split, audio_channel="1", audio_encoding="FLAC",
                       audio_bit_sample="16", language=language)


def build_demo(out: str | Path, *, languages: tuple[str, ...] = DEFAULT_LANGUAGES,
               max_per_language: int | None = DEFAULT_MAX_PER_LANGUAGE, seed: int = 0,
               klettres_dir: str | Path = KLETTRES_DIR, progress: bool = True) -> DemoResult:
    """Build the demo corpus in ``out``: ``audio/{real,fake}/*.flac`` and ``{train,valid,test}.csv``."""
    out, klettres_dir = Path(out), Path(klettres_dir)
    unknown = [language for language in languages if language not in ESPEAK_VOICES]
    if unknown:
        raise ValueError(f"no espeak-ng voice for klettres language(s) {unknown}; known: {sorted(ESPEAK_VOICES)}")
    recordings, missing = [], []
    for language in languages:
        found, absent = list_recordings(klettres_dir, language)
        recordings += select(found, max_per_language, seed)
        missing += absent
    splits = assign_splits(recordings, seed)
    attack_rng = random.Random(f"{seed}-attacks")
    rows, rejected = [], []
    for recording in tqdm(recordings, desc="demo corpus", unit="text", disable=not progress):
        split = splits[(recording.language, recording.text)]
        attack = attack_rng.choice(ATTACKS)
        voice = ESPEAK_VOICES[recording.language]
        pair = [("real", f"KLETTRES-{recording.key}", lambda: genuine_waveform(recording.path), "-",
                 f"klettres-{recording.language}"),
                ("fake", f"ESPEAK-{recording.key}", lambda: synthetic_waveform(recording.text, voice, attack),
                 attack.name, f"espeak-{voice}+{attack.variant}")]
        for label, row_id, make, attack_name, speaker in pair:
            try:
                samples = make()
            except audio.AudioError as error:
                rejected.append(f"{row_id}: {error}")
                continue
            rows.append(_row(row_id, label, out, samples, attack_name, speaker, split, recording.language))
    csv_paths = {}
    for split, _ in SPLIT_FRACTIONS:
        csv_paths[split] = out / f"{split}.csv"
        write_protocol([row for row in rows if row.proportion == split], csv_paths[split])
    return DemoResult(rows, csv_paths, missing, rejected)


def summary(result: DemoResult) -> str:
    counts = Counter((row.proportion, row.label) for row in result.rows)
    seconds = sum(row.duration_s for row in result.rows)
    lines = [f"{len(result.rows)} files, {seconds / 60:.1f} min"]
    lines += [f"  {split:<5} real {counts[(split, 'real')]:>4}  fake {counts[(split, 'fake')]:>4}  -> {path}"
              for split, path in result.csv_paths.items()]
    if result.missing:
        lines.append(f"  {len(result.missing)} sounds.xml entries without audio in the package (skipped)")
    if result.rejected:
        lines.append(f"  {len(result.rejected)} rejected: {'; '.join(result.rejected[:3])}")
    return "\n".join(lines)
