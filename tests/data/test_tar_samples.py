"""The loader's tar reader against Python's tarfile, on the tars the shard builder writes and on the
variants a tar may hold (pax and GNU long names, directories), and what it does with a broken tar."""

import io
import logging
import shutil
import tarfile

import pytest

from posttrain.config import StreamConfig
from posttrain.data.shards import iter_shard
from posttrain.data.stream import ShardStream
from posttrain.data.tar_samples import TarDamage, tar_samples

LONG_KEY = "K" * 150  # beyond the 100 bytes of a ustar name: a pax or GNU long-name member before it


def _tar(members: list[tuple[str, bytes]], tar_format: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tar_format) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


JSON = b"{" + b" " * 600 + b"}"
MEMBERS = [("a.flac", b"1" * 700), ("a.json", JSON), ("dir/", b""), ("README", b"no extension"),
           (f"sub/{LONG_KEY}.FLAC", b"2" * 512), (f"sub/{LONG_KEY}.json", b"[]"), ("c.x.json", b"3")]
EXPECTED = [("a", {"flac": b"1" * 700, "json": JSON}),
            (f"sub/{LONG_KEY}", {"flac": b"2" * 512, "json": b"[]"}), ("c", {"x.json": b"3"})]


def test_reads_the_builders_shards_as_tarfile_does(shard_dir):
    for path in sorted(shard_dir.glob("*.tar")):
        with open(path, "rb") as stream:
            assert list(tar_samples(stream)) == list(iter_shard(path))


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_groups_members_by_key_in_every_tar_format(tar_format):
    members = MEMBERS if tar_format != tarfile.USTAR_FORMAT else [m for m in MEMBERS if LONG_KEY not in m[0]]
    expected = EXPECTED if tar_format != tarfile.USTAR_FORMAT else [s for s in EXPECTED if LONG_KEY not in s[0]]
    assert list(tar_samples(io.BytesIO(_tar(members, tar_format)))) == expected
    skipped = list(tar_samples(io.BytesIO(_tar(members, tar_format)), skip={"a"}))
    assert skipped == expected[1:]


def test_a_broken_tar_hands_out_what_came_before_then_says_where():
    data = _tar(MEMBERS)
    samples = tar_samples(io.BytesIO(data[:512 + 1024 + 512 + 100]))  # inside a.json's data
    assert next(samples) == ("a", {"flac": b"1" * 700})  # incomplete: the loader counts it corrupt
    with pytest.raises(TarDamage, match="ends inside the member at byte 1536"):
        next(samples)
    garbage = bytearray(data)
    garbage[1536 + 10] ^= 0xFF  # a.json's header: its checksum no longer holds
    samples = tar_samples(io.BytesIO(bytes(garbage)))
    assert next(samples) == ("a", {"flac": b"1" * 700})
    with pytest.raises(TarDamage, match="no tar header at byte 1536"):
        next(samples)
    assert list(tar_samples(io.BytesIO(data[:-1024 * 10]))) == EXPECTED  # no end blocks: a clean end


def test_the_loader_counts_the_samples_after_a_break_as_missing(make_shard_set, tmp_path, caplog):
    directory, written = make_shard_set("cut", [6], seconds=(0.2, 0.4), seed=9)
    broken = tmp_path / "cut"
    shutil.copytree(directory, broken)
    tar = broken / "cut-000000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[:len(data) // 2])
    stream = ShardStream(StreamConfig(shards=[str(broken)], num_workers=0, max_batch_seconds=3.0), rank=0,
                         world_size=1)
    with caplog.at_level(logging.WARNING, logger="posttrain.data.epoch_reader"):
        delivered = [i for batch in stream for i in batch.ids]
    stats = stream.stats()
    assert 0 < len(delivered) < 6 and set(delivered) < set(written)
    assert len(delivered) + stats["corrupt"] == 6 and stats["corrupt_by_reason"]["missing"] >= 1
    assert "cut-000000.tar: " in caplog.text and "the samples after it count as missing" in caplog.text
    assert stream.state_dict()["consumed"] == {"0:0:0": 6}  # all settled: a resume reads none of them again
