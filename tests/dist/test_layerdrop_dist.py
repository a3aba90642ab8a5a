"""LayerDrop under ZeRO-2 with two real ranks (gloo, DS_ACCELERATOR=cpu): every rank skips the same layers.

Drawn per rank (transformers' own draws from per-rank seeded generators), the ranks hand ZeRO's gradient
reduction different parameter sets and gloo fails with "a distributed collective mismatch" (checked by
hand); posttrain's synchronised draws keep the collectives and the replicas identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from posttrain.dist import free_port

WORLD_SIZE = 2
STEPS = 6


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from posttrain.config import ModelConfig
    from posttrain.models.detector import build_detector

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    torch.manual_seed(0)  # identical initial weights
    model = build_detector(ModelConfig(preset="tiny", layerdrop=0.5), layerdrop_seed=1234)
    torch.manual_seed(1000 * (rank + 1))  # per-rank generators, as the engine seeds them
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                                              "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0})
    ran: list[int] = []
    for index, layer in enumerate(model.encoder.encoder.layers):
        layer.register_forward_hook(lambda module, inputs, output, index=index: ran.append(index))
    layers = []
    for _ in range(STEPS):
        ran.clear()
        logits = engine(torch.randn(2, 4000), torch.tensor([4000, 3000]))
        engine.backward(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
        engine.step()
        layers.append(list(ran))
    flat = torch.cat([param.detach().flatten() for param in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"layers": layers,
                                                         "replicas_equal": torch.equal(gathered[0], gathered[1])}))


@pytest.mark.slow
def test_layerdrop_under_zero2_skips_the_same_layers_on_both_ranks(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    assert ranks[0]["layers"] == ranks[1]["layers"]
    assert len({tuple(layers) for layers in ranks[0]["layers"]}) > 1  # layers really are dropped, variably
    assert all(rank["replicas_equal"] for rank in ranks)
