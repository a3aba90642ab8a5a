"""Checkpoint files without a process group: pointers, completion, pruning, RNG states, resume lookup.
(Collective save/load, resume and universal conversion run in tests/dist/test_engine_dist.py.)"""

import json
import random

import numpy as np
import pytest
import torch

from posttrain.train import checkpoint as ckpt
from posttrain.train.rng import rng_state, set_rng_state


def make_tag(root, step, complete=True):
    tag_dir = root / ckpt.tag_for_step(step)
    (tag_dir / "rng").mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    if complete:
        (tag_dir / ckpt.METADATA_FILE).write_text(json.dumps(
            {"format": ckpt.METADATA_FORMAT, "version": ckpt.METADATA_VERSION, "tag": tag_dir.name}))
    return tag_dir.name


def test_latest_never_points_at_an_incomplete_checkpoint(tmp_path):
    done = make_tag(tmp_path, 100)
    ckpt.write_pointer(tmp_path, done)
    half = make_tag(tmp_path, 200, complete=False)  # a crash before posttrain.json was written
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.write_pointer(tmp_path, half)
    assert ckpt.read_pointer(tmp_path) == done
    assert ckpt.find_resume("auto", tmp_path.parent) is None  # <output_dir>/checkpoints does not exist
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / done
    assert ckpt.list_tags(tmp_path) == [done]
    # no temp file is left behind by the atomic write
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["latest"]


def test_find_resume(tmp_path):
    root = ckpt.checkpoint_root(tmp_path / "run")
    root.mkdir(parents=True)
    assert ckpt.find_resume("auto", tmp_path / "run") is None
    tag = make_tag(root, 5)
    ckpt.write_pointer(root, tag)
    assert ckpt.find_resume("auto", tmp_path / "run") == root / tag
    assert ckpt.find_resume("none", tmp_path / "run") is None
    assert ckpt.find_resume(str(root / tag), tmp_path / "elsewhere") == root / tag
    assert ckpt.find_resume(str(tmp_path / "run"), tmp_path / "elsewhere") == root / tag
    with pytest.raises(ckpt.CheckpointError, match="no 'latest'"):
        ckpt.find_resume(str(tmp_path / "missing"), tmp_path)


def test_prune_keeps_last_latest_and_best(tmp_path):
    tags = [make_tag(tmp_path, step) for step in (10, 20, 30, 40, 50)]
    stale = make_tag(tmp_path, 5, complete=False)
    (tmp_path / "universal" / tags[1]).mkdir(parents=True)
    ckpt.write_pointer(tmp_path, tags[1], ckpt.BEST)
    ckpt.write_pointer(tmp_path, tags[-1], ckpt.LATEST)
    deleted = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(deleted) == sorted([tags[0], tags[2], stale])
    assert ckpt.list_tags(tmp_path) == [tags[1], tags[3], tags[4]]
    assert (tmp_path / "universal" / tags[1]).is_dir()
    # an incomplete folder newer than latest may be a save in progress: never touched
    in_progress = make_tag(tmp_path, 60, complete=False)
    ckpt.prune(tmp_path, keep_last=2)
    assert (tmp_path / in_progress).is_dir()


def test_read_metadata_rejects_foreign_files(tmp_path):
    (tmp_path / ckpt.METADATA_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ckpt.CheckpointError, match="expected posttrain-checkpoint"):
        ckpt.read_metadata(tmp_path)
    (tmp_path / ckpt.METADATA_FILE).write_text("{broken")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.read_metadata(tmp_path)


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in NumPy's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
    assert not ckpt.load_rng(tmp_path, rank=3)  # a rank the checkpoint has no state for


def test_epoch_end_tags_sort_after_the_same_step(tmp_path):
    tags = [make_tag(tmp_path, 7), make_tag(tmp_path, 12)]
    epoch_end = tmp_path / "step-00000007-epoch1"
    (epoch_end / ckpt.METADATA_FILE).parent.mkdir()
    (epoch_end / ckpt.METADATA_FILE).write_text("{}")
    assert ckpt.list_tags(tmp_path) == [tags[0], epoch_end.name, tags[1]]
    ckpt.write_pointer(tmp_path, tags[1])
    assert ckpt.prune(tmp_path, keep_last=1) == [tags[0], epoch_end.name]


def test_no_checkpoint_can_be_written_between_the_two_sam_passes(tmp_path):
    from posttrain.train import perturbation
    from posttrain.train.checkpoint import save_checkpoint

    class Engine:
        saved = False

        def save_checkpoint(self, *args, **kwargs):
            self.saved = True

    engine = Engine()
    perturbation.mark_perturbed(engine, "sam")
    try:
        with pytest.raises(perturbation.PerturbedWeightsError, match="write a checkpoint"):
            save_checkpoint(engine, tmp_path, "step-00000001", {}, "", keep_last=1)
    finally:
        perturbation.clear_perturbed(engine)
    assert not engine.saved and not (tmp_path / "step-00000001").exists()


def test_rng_preserved_leaves_python_numpy_and_torch_as_they_were():
    """What GRPO's frozen-model build runs in: it seeds every generator, and training's streams (NumPy's is
    SpecAugment's) must carry on afterwards as if it had not (torch's fork_rng keeps torch's only)."""
    import random

    from posttrain.train.rng import rng_preserved

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    saved = rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(saved)
    with rng_preserved():
        random.seed(3), np.random.seed(3), torch.manual_seed(3)
        random.random(), np.random.rand(), torch.rand(1)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
