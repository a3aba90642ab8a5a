"""The full-size path: xlsr_300m (317M) built, stepped, checkpointed and resumed at its real size.

Two spawned processes in turn (world of one, gloo, DeepSpeed on CPU; ZeRO-2 bf16 runs the same
partitioning code as at any world size): the parameter count against the planner's meta-device count and the released size,
one SAM step on a short clip (so AdamW's moments exist), the project's collective checkpoint, and a
fresh engine resumed from it whose fp32 master weights and moments equal the saved ones exactly
(compared through float64 fingerprints, so the test holds one model's states at a time) and whose
checkpoint files are as large as the planner's model-state bytes say. Peak memory ~6 GiB.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from posttrain.dist import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PRESET = "xlsr_300m"


def _fingerprint(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Per tensor: float64 sum, sum of squares, and the first and last 64 values."""
    out = []
    for tensor in tensors:
        flat = tensor.detach().flatten().double()
        out.append([float(flat.sum()), float((flat * flat).sum()), *flat[:64].tolist(), *flat[-64:].tolist()])
    return out


def _states(engine) -> dict:
    optimizer = engine.optimizer
    masters = list(optimizer.single_partition_of_fp32_groups)
    moments = [optimizer.optimizer.state[m][key] for m in masters for key in ("exp_avg", "exp_avg_sq")]
    return {"master": _fingerprint(masters), "moments": _fingerprint(moments)}


def _worker(rank: int, port: int, out_dir: str, phase: str) -> None:
    """``save``: build, one SAM step, checkpoint; ``resume``: a fresh engine loaded from it. Each phase
    is its own process, so only one model's states are ever in memory."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from posttrain.bench.fullsize import _overrides, build_engine, clip_batch
    from posttrain.config import load_config
    from posttrain.train import checkpoint as ckpt
    from posttrain.dist import start_process_group
    from posttrain.train.step import StepContext, get_step_mode

    cfg = load_config(None, _overrides(PRESET, 2))
    start_process_group(torch.device("cpu"), deepspeed=True)
    model, optimizer, scheduler, engine = build_engine(cfg)
    root = Path(out_dir) / "checkpoints"
    if phase == "save":
        ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"), world_size=1)
        stats = get_step_mode("sam")(engine, [clip_batch(0.5, torch.Generator().manual_seed(0))], ctx)
        tag_dir = ckpt.save_checkpoint(engine, root, "step-1", {"world_size": 1, "progress": {"step": 1}}, "", 1)
        result = {"parameters": sum(p.numel() for p in model.parameters()), "loss": stats.loss,
                  "skipped": stats.skipped, "states": _states(engine),
                  "files": {p.name: p.stat().st_size for p in tag_dir.glob("*.pt")}}
    else:
        tag_dir = ckpt.resolve_checkpoint(root)
        ckpt.restore_engine(engine, tag_dir, universal=False)
        result = {"states": _states(engine), "metadata": ckpt.read_metadata(tag_dir)["progress"]}
    Path(out_dir, f"{phase}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_xlsr_300m_trains_checkpoints_and_resumes_at_full_size(tmp_path):
    from posttrain.models.presets import get_preset
    from posttrain.train.plan import model_state_bytes, parameter_counts

    for phase in ("save", "resume"):
        mp.spawn(_worker, args=(free_port(), str(tmp_path), phase), nprocs=1, join=True)
    result = json.loads((tmp_path / "save.json").read_text())
    resumed = json.loads((tmp_path / "resume.json").read_text())
    total, largest = parameter_counts(PRESET)
    assert result["parameters"] == total == 315_439_746
    assert total == pytest.approx(get_preset(PRESET).params_millions * 1e6, rel=0.01)
    assert not result["skipped"] and 0 < result["loss"] < 10
    assert resumed["states"] == result["states"]  # bit-exact fp32 master weights and Adam moments
    assert resumed["metadata"] == {"step": 1}
    # on disk: the bf16 module (2 P) and the optimiser file (fp32 master + two moments, 12 P)
    params, _, optim = model_state_bytes(total, largest, 2, "bf16", 1)
    sizes = result["files"]
    model_file = next(size for name, size in sizes.items() if name.startswith("mp_rank"))
    optim_file = next(size for name, size in sizes.items() if "optim_states" in name)
    assert model_file == pytest.approx(params, rel=0.02)
    assert optim_file == pytest.approx(optim, rel=0.02)
