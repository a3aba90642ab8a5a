"""Every model source opened without reading its weights (what a ZeRO-3 build loads into its partitions,
``posttrain.models.partitioned``) reads exactly the tensors the full-state-dict path loads, and refuses
a bad file with the very message the full path gives. Single process: the readers are called directly."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import fairseq_release_state, random_detector
from safetensors.torch import save_file

from posttrain.hub import antideepfake, export
from posttrain.models.partitioned import key_mismatch
from posttrain.models.tensor_files import file_readers, mapped_pickle
from posttrain.train.checkpoint import consolidate_fp32, open_checkpoint


def _read_all(open_readers) -> dict[str, torch.Tensor]:
    return {key: read() for key, read in open_readers().items()}


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    assert not [key for key in want if not torch.equal(got[key], want[key])]


@pytest.fixture(scope="module")
def release_state():
    return fairseq_release_state(random_detector("tiny_group_norm", seed=2))


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt"])
def test_a_release_reads_the_tensors_it_converts_to(name, release_state, tmp_path):
    path = tmp_path / name
    save_file(release_state, path) if name.endswith(".safetensors") else torch.save(release_state, path)
    detector, identity = antideepfake.convert_checkpoint(path)
    shell, opened, open_readers = antideepfake.open_release(path)
    assert opened == identity and shell.ssl_config.to_dict() == detector.ssl_config.to_dict()
    assert all(p.is_meta for p in shell.parameters())
    _assert_identical(_read_all(open_readers), detector.state_dict())


class _Payload:
    def __reduce__(self):
        return os.getpid, ()


def _bad_releases(folder, state) -> list[str]:
    """Writes a release of each kind the converter refuses; their file names."""
    truncated = folder / "truncated.safetensors"
    save_file(state, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    torch.save({**state, "payload": _Payload()}, folder / "code.ckpt")
    torch.save(list(state.values()), folder / "list.pt")
    (folder / "weights.npz").write_bytes(b"PK")
    save_file({**state, "m_ssl.model.encoder.adapter.weight": torch.zeros(2)}, folder / "unknown.safetensors")
    save_file({k: v for k, v in state.items() if k != "proj_fc.bias"}, folder / "missing.safetensors")
    return ["truncated.safetensors", "code.ckpt", "list.pt", "weights.npz", "unknown.safetensors",
            "missing.safetensors"]


def test_a_bad_release_is_refused_with_the_full_paths_message(release_state, tmp_path):
    for name in _bad_releases(tmp_path, release_state):
        with pytest.raises(antideepfake.ConversionError) as full:
            antideepfake.convert_checkpoint(tmp_path / name)
        with pytest.raises(antideepfake.ConversionError) as lazy:
            antideepfake.open_release(tmp_path / name)
        assert str(lazy.value) == str(full.value) and "\n" not in str(full.value), name


def test_an_export_reads_the_tensors_it_loads(tiny_export_dir):
    detector, identity = export.load_export(tiny_export_dir)
    shell, opened, open_readers = export.open_export(tiny_export_dir)
    assert opened == identity
    _assert_identical(_read_all(open_readers), detector.state_dict())


def test_a_checkpoint_reads_the_tensors_it_consolidates(tiny_checkpoint):
    state, metadata = consolidate_fp32(tiny_checkpoint)
    opened, open_readers = open_checkpoint(tiny_checkpoint)
    assert opened == metadata
    _assert_identical(_read_all(open_readers), state)


def test_a_key_mismatch_reads_as_load_state_dicts_own_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = {"0.weight": torch.zeros(2, 2), "1.bias": torch.zeros(2)}
    with pytest.raises(RuntimeError) as torch_error:
        model.load_state_dict(state, strict=True)
    assert str(key_mismatch(model, state)) == str(torch_error.value)
    assert key_mismatch(model, dict(model.state_dict())) is None


def test_pickles_are_mapped_and_a_legacy_one_is_read_whole(tmp_path):
    state = {"a": torch.arange(6.0)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(mapped_pickle(tmp_path / name)["a"], state["a"])
        assert torch.equal(file_readers(tmp_path / name)["a"](), state["a"])
