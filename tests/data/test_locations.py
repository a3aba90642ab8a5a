"""Shard sets behind URLs and pipe: commands: retries that resume the byte stream, exactly once."""

from collections import Counter

import numpy as np
import pytest
from conftest import DroppingHTTPServer

from posttrain.config import CropConfig, StreamConfig
from posttrain.data import locations
from posttrain.data.locations import RetryingReader, RetryPolicy, ShardReadError
from posttrain.data.stream import ShardStream

FAST = RetryPolicy(attempts=4, backoff_seconds=0.01)


@pytest.fixture(scope="module")
def shard_set(make_shard_set):
    directory, durations = make_shard_set("net", [6, 5, 7], seconds=(0.2, 0.6), seed=11)
    return directory, durations


def _flaky_pipe(tmp_path, directory) -> str:
    """A pipe: location whose command, on the first run for each file, writes half of it and fails."""
    script = tmp_path / "flaky.sh"
    script.write_text('f="$1"; m="$2/$(basename "$f").runs"; n=$(cat "$m" 2>/dev/null || echo 0); '
                      'echo $((n + 1)) > "$m"; if [ "$n" -eq 0 ]; then head -c $(( $(wc -c < "$f") / 2 )) "$f"; '
                      'exit 1; fi; cat "$f"\n')
    return f"pipe:sh {script} {directory}/{{name}} {tmp_path}"


def _waves(stream) -> dict[str, float]:
    """id -> sum of its samples, over one epoch (each id must come once)."""
    out, ids = {}, []
    for batch in stream:
        for row, sample_id in enumerate(batch.ids):
            out[sample_id] = float(batch.waveforms[row, : batch.lengths[row]].double().sum())
            ids.append(sample_id)
    assert Counter(ids) == Counter(set(ids))  # no id twice
    return out


def _cfg(location, **options):
    defaults = dict(num_workers=0, max_batch_seconds=2.0, shuffle_buffer=4, crop=CropConfig(policy="none"),
                    read_attempts=6, read_backoff_seconds=0.01, read_timeout_seconds=10.0)
    return StreamConfig(shards=[str(location)], **dict(defaults, **options))


def test_locations_join_and_kinds(tmp_path):
    assert locations.join("https://host/a/", "index.json") == "https://host/a/index.json"
    assert locations.join("s3://bucket/train", "x.tar") == "s3://bucket/train/x.tar"
    assert locations.join("pipe:curl -sfL https://h/t/{name}", "x.tar") == "pipe:curl -sfL https://h/t/x.tar"
    assert locations.join(str(tmp_path), "x.tar") == str(tmp_path / "x.tar")
    assert locations.is_local("file:///data") and locations.is_local("/data") and locations.is_url("gs://b/p")
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        locations.join("pipe:cat /data/train.tar", "index.json")


def test_retrying_reader_resumes_a_failing_command_and_gives_up_naming_the_byte(shard_set, tmp_path):
    directory, _ = shard_set
    tar = sorted(directory.glob("*.tar"))[0]
    data = tar.read_bytes()
    reader = RetryingReader(locations.join(_flaky_pipe(tmp_path, directory), tar.name), len(data), FAST)
    assert reader.read() == data  # half from the failed run, the rest from the second run after skipping
    assert reader.retries == 1
    broken = RetryingReader(f"pipe:head -c 100 {tar}", len(data), FAST)
    with pytest.raises(ShardReadError, match=rf"head -c 100 .* at byte 100 of {len(data)}, 4 attempts"):
        broken.read()


def test_pipe_and_fsspec_shard_sets_deliver_what_the_folder_delivers(shard_set, tmp_path):
    """The same epoch (ids and audio) from the folder, from a pipe: command that breaks once per
    file, from an fsspec URL (memory://) and from an HTTP server that drops every shard mid-way."""
    import fsspec

    directory, durations = shard_set
    local = _waves(ShardStream(_cfg(directory), rank=0, world_size=1))
    assert set(local) == set(durations)
    piped = _waves(ShardStream(_cfg(_flaky_pipe(tmp_path, directory)), rank=0, world_size=1))
    assert piped == local
    memory = fsspec.filesystem("memory")
    for path in directory.iterdir():
        memory.pipe(f"/net-{tmp_path.name}/{path.name}", path.read_bytes())
    assert _waves(ShardStream(_cfg(f"memory:///net-{tmp_path.name}"), rank=0, world_size=1)) == local
    with DroppingHTTPServer(directory.parent) as server:
        stream = ShardStream(_cfg(f"{server.url}/{directory.name}", num_workers=2), rank=0, world_size=1)
        assert _waves(stream) == local
        stream.close()
    assert server.drops >= 3 + 1 and server.resumed >= 3  # every shard broke once and resumed; the index too


def test_missing_url_and_unreadable_shard_fail_with_one_line(shard_set, tmp_path):
    directory, _ = shard_set
    with DroppingHTTPServer(directory.parent) as server:
        with pytest.raises(ValueError, match=r"/nowhere/index.json: no shard index there"):
            ShardStream(_cfg(f"{server.url}/nowhere"), rank=0, world_size=1)
    # every read of every shard fails: the loader stops, naming the shard, instead of skipping it
    cut = f"pipe:sh -c 'case {{name}} in *.tar) head -c 700 {directory}/{{name}};; *) cat {directory}/{{name}};; esac'"
    stream = ShardStream(_cfg(cut), rank=0, world_size=1)
    with pytest.raises(ShardReadError, match=r"net-00000\d.tar.* at byte 700 of"):
        list(stream)
    assert np.isfinite(FAST.wait(3))
