"""The partial-spoof builder: the sidecar's boundaries are where the audio was actually spliced."""

import numpy as np
import pytest

from posttrain.data import audio
from posttrain.data.partialspoof import (SEGMENTS_NAME, build_partialspoof, read_segments, spoof_regions)
from posttrain.data.protocol import ProtocolRow, read_protocol, write_protocol

RATE = 16_000
TONE_HZ = 1000.0


def _source_corpus(directory):
    """Real clips are noise, fake clips a 1 kHz tone; lengths in samples that are not round seconds."""
    rng = np.random.default_rng(0)
    rows = []
    for index in range(10):
        label = "fake" if index % 2 else "real"
        frames = 4000 + 517 * index
        samples = (0.3 * np.sin(2 * np.pi * TONE_HZ * np.arange(frames) / RATE) if label == "fake"
                   else 0.1 * rng.standard_normal(frames)).astype(np.float32)
        (directory / "audio").mkdir(exist_ok=True)
        (directory / "audio" / f"{index}.flac").write_bytes(audio.encode_flac(samples))
        rows.append(ProtocolRow(id=f"SRC-{index}", label=label, duration_s=frames / RATE,
                                path=f"$ROOT/audio/{index}.flac", sample_rate_hz=RATE, language="xx"))
    write_protocol(rows, directory / "test.csv")
    return directory / "test.csv"


def _tone_frames(samples, frame=160):
    """Per 10 ms frame: is it the tone (its energy at 1 kHz dominates, Goertzel-style projection)?"""
    count = len(samples) // frame
    frames = samples[: count * frame].reshape(count, frame)
    phase = 2 * np.pi * TONE_HZ * np.arange(frame) / RATE
    at_tone = np.hypot(frames @ np.sin(phase), frames @ np.cos(phase)) * 2 / frame
    rms = np.sqrt(np.mean(frames ** 2, axis=1)) * np.sqrt(2)
    return at_tone > 0.9 * rms


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    protocol = _source_corpus(source)
    out = tmp_path_factory.mktemp("partial")
    return source, protocol, out, build_partialspoof(protocol, source, out, files=9, clips_per_file=4, seed=3,
                                                     progress=False)


def test_sidecar_boundaries_are_the_spliced_audio(built):
    source, protocol, out, result = built
    sources = {row.id: audio.load(row.resolved_path(source)).samples for row in read_protocol(protocol)}
    rows = read_protocol(out / "partialspoof.csv")  # reloaded, as the rest of the system reads it
    segments = read_segments(out / SEGMENTS_NAME)
    assert [row.id for row in rows] == list(segments) and len(rows) == 9
    for row in rows:
        samples = audio.load(row.resolved_path(out)).samples
        file_segments = segments[row.id]
        assert file_segments[-1].stop == len(samples) and row.duration_s == pytest.approx(len(samples) / RATE, abs=1e-5)  # Duration: 6 digits
        for segment in file_segments:  # each clip sits exactly at its sidecar span (16-bit FLAC twice)
            np.testing.assert_allclose(samples[segment.start:segment.stop], sources[segment.source], atol=2 / 32768)
        regions = spoof_regions(file_segments)
        kind = row.id.split("-")[1]
        assert row.label == ("real" if kind == "real" else "fake")
        assert len(regions) == {"real": 0, "realhost": 1, "fakehost": 2}[kind]
        # find the tone (the fake audio) in the file itself: it fills exactly the sidecar's fake frames
        tone = _tone_frames(samples)
        truth = np.zeros(len(samples), dtype=bool)
        for start, stop in regions:
            truth[start:stop] = True
        inside = truth[: len(tone) * 160].reshape(len(tone), 160)
        clip = np.repeat(np.arange(len(file_segments)), [s.stop - s.start for s in file_segments])
        clip = clip[: len(tone) * 160].reshape(len(tone), 160)
        whole = (clip == clip[:, :1]).all(axis=1)  # frames that straddle a joint (tone phase jumps) prove nothing
        assert (tone[whole] == inside.all(axis=1)[whole]).all(), row.id


def test_same_seed_same_set_other_seed_other_set(built, tmp_path):
    source, protocol, out, _ = built
    again = build_partialspoof(protocol, source, tmp_path / "again", files=9, clips_per_file=4, seed=3, progress=False)
    assert (again.segments_path.read_bytes() == (out / SEGMENTS_NAME).read_bytes())
    assert (again.protocol_path.read_bytes() == (out / "partialspoof.csv").read_bytes())
    other = build_partialspoof(protocol, source, tmp_path / "other", files=9, clips_per_file=4, seed=4, progress=False)
    assert other.segments_path.read_bytes() != again.segments_path.read_bytes()


def test_a_segments_file_with_a_gap_is_refused_by_line(tmp_path):
    path = tmp_path / "bad.segments.csv"
    path.write_text("ID,StartS,EndS,Label,Source\na,0.0,0.5,real,x\na,0.6,1.0,fake,y\n")
    with pytest.raises(ValueError, match=r"bad.segments.csv:3: a: .*must start at 0.5"):
        read_segments(path)
    path.write_text("ID,StartS,EndS,Label,Source\na,0.0,0.5,spoofy,x\n")
    with pytest.raises(ValueError, match=r":2: Label must be one of"):
        read_segments(path)


def test_too_few_rows_of_a_label_is_a_clear_error(tmp_path):
    protocol = _source_corpus(tmp_path)
    with pytest.raises(ValueError, match="5 real row.*clips_per_file=6"):
        build_partialspoof(protocol, tmp_path, tmp_path / "out", clips_per_file=6, progress=False)
