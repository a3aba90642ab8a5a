"""ZeRO-3 detectors built in partitions (``posttrain.models.partitioned``) in real process groups (gloo,
DS_ACCELERATOR=cpu, spawned ranks): the same weights as a plain build, bit for bit, at world size 1 and 2;
a ZeRO-3 fine-tune loads a posttrain checkpoint, an AntiDeepfake release (safetensors and pickle) and a
transformers export into the partitions with exactly the weights of the old full-state-dict path; a bad
release gives the same one-line error on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from posttrain.config import FinetuneConfig, ModelConfig, TrainConfig, load_config
from posttrain.dist import free_port
from posttrain.models.detector import build_detector

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SEED = 7
PRESETS = ("tiny", "tiny_group_norm", "tiny_hubert", "tiny_wavlm", "tiny_wavlm_layer_norm")


def zero3_config(precision: str) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _gathered(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full (collective: the same order on every rank)."""
    import deepspeed

    full = {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters(param):
            full[name] = param.detach().clone()
    return full


def _engine_weights(engine) -> dict[str, torch.Tensor]:
    """The engine's fp32 master weights in full (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(param).clone() for name, param in engine.module.named_parameters()}


def _save(work: Path, name: str, value) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(value, work / f"{name}.pt")


# ------------------------------------------------------------------------------------ rank programs


def _build_program(work: Path, shards: dict) -> None:
    """Every tiny preset built in partitions (fp32; bf16 for tiny), checked partitioned right after
    construction; a ZeRO-3 Trainer with and without train.partitioned_init (world size 2 only)."""
    import torch.distributed as dist

    from posttrain.models.partitioned import is_partitioned

    flags = {}
    for preset in PRESETS:
        for precision in ("fp32", "bf16") if preset == "tiny" else ("fp32",):
            torch.manual_seed(SEED)
            detector = build_detector(ModelConfig(preset=preset), zero3=zero3_config(precision))
            flags[f"{preset}-{precision}"] = is_partitioned(detector) and all(
                hasattr(p, "ds_id") and p.numel() == 0 for p in detector.parameters())
            _save(work, f"{preset}-{precision}", _gathered(detector))
    torch.manual_seed(SEED)
    pretrained = ModelConfig(preset="tiny", pretrained=shards["ssl"])
    _save(work, "pretrained", _gathered(build_detector(pretrained, zero3=zero3_config("fp32"))))
    if dist.get_world_size() > 1:
        from posttrain.train.trainer import Trainer

        class Probe(Trainer):  # records whether the model came out of _build_model in partitions
            def _build_model(self, metadata):
                model, cfg = super()._build_model(metadata)
                flags[f"trainer-{partitioned}"] = is_partitioned(model)
                return model, cfg

        for partitioned in ("true", "false"):
            cfg = load_config(None, [f"output_dir={work}/trainer-{partitioned}", "model.preset=tiny",
                                     f"data.train.shards=[{shards['train']}]", "train.zero_stage=3",
                                     "train.precision=fp32", "train.device=cpu", "tracking.enabled=false",
                                     f"train.partitioned_init={partitioned}", "data.train.num_workers=0"])
            trainer = Probe(cfg)
            _save(work, f"trainer-{partitioned}", _engine_weights(trainer.engine))
            trainer.release()
    if dist.get_rank() == 0:
        (work / "flags.json").write_text(json.dumps(flags))


def _finetune_cfg(work: Path, shards: dict, source: str, name: str, *, zero_stage: int = 3) -> FinetuneConfig:
    return load_config(None, [f"output_dir={work}/{name}", "model.preset=tiny", f"finetune.init_from={source}",
                              f"data.train.shards=[{shards['train']}]", f"train.zero_stage={zero_stage}",
                              "train.precision=fp32", "train.device=cpu", "tracking.enabled=false",
                              "data.train.num_workers=0"], cls=FinetuneConfig)


def _load_program(work: Path, shards: dict) -> None:
    """A ZeRO-3 fine-tune set up from each source (its engine's fp32 weights saved); the bad release's error."""
    import torch.distributed as dist

    from posttrain.finetuning import FinetuneTrainer, make_accelerator
    from posttrain.loading import load_model

    from posttrain.models.partitioned import is_partitioned

    class Probe(FinetuneTrainer):  # records whether the model came out of _build_model in partitions
        def _build_model(self, metadata):
            model, cfg = super()._build_model(metadata)
            built[name] = is_partitioned(model)
            return model, cfg

    accelerator, built = None, {}
    for name, source in shards["sources"].items():
        cfg = _finetune_cfg(work, shards, source, name)
        accelerator = accelerator or make_accelerator(cfg)
        trainer = Probe(cfg, accelerator, load_model)
        _save(work, f"finetune-{name}", _engine_weights(trainer.engine))
        trainer.release()
    if dist.get_rank() == 0:
        (work / "built.json").write_text(json.dumps(built))
    errors = []
    try:
        FinetuneTrainer(_finetune_cfg(work, shards, shards["bad"], "bad"), accelerator, load_model)
    except Exception as error:  # noqa: BLE001 - the test compares the message with the old path's
        errors.append(f"{type(error).__name__}: {error}")
    (work / f"bad-rank{dist.get_rank()}.json").write_text(json.dumps(errors))


def _rank_main(rank: int, world_size: int, port: int, program: str, work: str, shards: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from posttrain.dist import start_process_group

    start_process_group(torch.device("cpu"), deepspeed=True)
    globals()[program](Path(work), shards)
    # every rank done before any leaves: a rank exiting with the group up can abort another's gloo threads
    # ("terminate called without an active exception", SIGABRT on a loaded machine)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _spawn(program: str, world_size: int, work: Path, shards: dict) -> None:
    mp.spawn(_rank_main, args=(world_size, free_port(), program, str(work), shards), nprocs=world_size, join=True)


def _plain(preset: str, precision: str = "fp32", seed: int = SEED, **model) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_detector(ModelConfig(preset=preset, **model)).state_dict()
    return {key: value.to(torch.bfloat16 if precision == "bf16" else torch.float32) for key, value in state.items()}


def _assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    different = [key for key in want if not torch.equal(got[key], want[key])]
    assert not different, different


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ssl_folder(tmp_path_factory) -> Path:
    """A tiny pre-trained SSL checkpoint as the hub holds them (``Wav2Vec2ForPreTraining``: the base-model
    prefix and the pre-training heads)."""
    from transformers import Wav2Vec2ForPreTraining

    from posttrain.models.presets import get_preset

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("ssl") / "tiny_ssl"
    Wav2Vec2ForPreTraining(get_preset("tiny").ssl_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    """A tiny AntiDeepfake release as model.safetensors and as a SpeechBrain .ckpt, and a truncated one."""
    from safetensors.torch import save_file

    from conftest import fairseq_release_state, random_detector

    folder = tmp_path_factory.mktemp("releases")
    state = fairseq_release_state(random_detector("tiny", seed=3))
    save_file(state, folder / "model.safetensors")
    torch.save(state, folder / "model.ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "bad").mkdir()
    (folder / "bad" / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"safetensors": folder / "model.safetensors", "ckpt": folder / "model.ckpt",
            "bad": folder / "bad" / "model.safetensors"}


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world_size", [1, 2])
def test_partitioned_build_is_the_plain_build_bit_for_bit(world_size, tmp_path, shard_dir, ssl_folder):
    _spawn("_build_program", world_size, tmp_path, {"train": str(shard_dir), "ssl": str(ssl_folder)})
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert all(flags[key] for key in flags if not key.startswith("trainer")), flags
    for preset in PRESETS:
        for precision in ("fp32", "bf16") if preset == "tiny" else ("fp32",):
            _assert_identical(torch.load(tmp_path / f"{preset}-{precision}.pt"), _plain(preset, precision))
    # model.pretrained: the SSL weights are from_pretrained's; the head is drawn as a random build draws it
    pretrained = torch.load(tmp_path / "pretrained.pt")
    reference = _plain("tiny", pretrained=str(ssl_folder))
    _assert_identical({k: v for k, v in pretrained.items() if k.startswith("encoder.")},
                      {k: v for k, v in reference.items() if k.startswith("encoder.")})
    if world_size > 1:  # the Trainer builds in partitions unless train.partitioned_init=false; same weights
        assert flags["trainer-true"] and not flags["trainer-false"]
        _assert_identical(torch.load(tmp_path / "trainer-true.pt"), torch.load(tmp_path / "trainer-false.pt"))
        _assert_identical(torch.load(tmp_path / "trainer-true.pt"), _plain("tiny", seed=TrainConfig().seed))


def test_zero3_finetune_loads_every_source_as_the_full_state_dict_path(tmp_path, shard_dir, tiny_checkpoint,
                                                                       tiny_export_dir, releases):
    from posttrain.finetuning import initial_detector
    from posttrain.loading import load_model

    sources = {"checkpoint": str(tiny_checkpoint), "export": str(tiny_export_dir),
               "release_safetensors": str(releases["safetensors"]), "release_ckpt": str(releases["ckpt"])}
    shards = {"train": str(shard_dir), "sources": sources, "bad": str(releases["bad"])}
    _spawn("_load_program", 2, tmp_path, shards)
    assert json.loads((tmp_path / "built.json").read_text()) == {name: True for name in sources}
    for name, source in sources.items():
        old, _ = initial_detector(_finetune_cfg(tmp_path, shards, source, f"old-{name}", zero_stage=2), None,
                                  load_model)
        _assert_identical(torch.load(tmp_path / f"finetune-{name}.pt"), dict(old.named_parameters()))
    with pytest.raises(Exception) as old_error:
        initial_detector(_finetune_cfg(tmp_path, shards, str(releases["bad"]), "old-bad", zero_stage=2), None,
                         load_model)
    expected = f"{old_error.type.__name__}: {old_error.value}"
    assert "not a readable safetensors file" in expected and "\n" not in expected
    for rank in (0, 1):
        assert json.loads((tmp_path / f"bad-rank{rank}.json").read_text()) == [expected]
