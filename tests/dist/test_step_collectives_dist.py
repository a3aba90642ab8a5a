"""The train step's collectives at world size 2 (gloo, DeepSpeed on CPU).

* Counts agreed by the loader's join collective (``stream._agree``, attached as ``Batch.global_counts``)
  give bit-identical weights and statistics to the step's own all_reduce, and the step then issues
  exactly ONE collective of its own (the finiteness/loss one), SAM and dual path included (their
  loss sums ride in it; their algorithm's own collectives, e.g. SAM's global norm, are not the step's).
* ``overlap_comm`` forced on gives the same SAM and dual-path weights as off (the code path that
  double-buffers reductions; on CPU there is no stream race to test, only DeepSpeed's bookkeeping).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from posttrain.dist import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORLD_SIZE = 2
MODES = {"plain": [], "sam": ["sam.enabled=true", "sam.rho=0.05"],
         "dual_path": ["dual_path.enabled=true", "dual_path.rawboost_algo=3"]}


def _batches(rank: int, step: int) -> list:
    """Two micro-batches of different sizes per rank (dynamic batching), one join batch on rank 1."""
    from posttrain.data.batch import Batch

    generator = torch.Generator().manual_seed(100 * step + rank)
    out = []
    for size in ((2, 3) if rank == 0 else (1, 0)):
        if size == 0:
            out.append(Batch.empty())
            continue
        lengths = torch.randint(1600, 3200, (size,), generator=generator)
        waves = torch.randn(size, int(lengths.max()), generator=generator) * 0.1
        out.append(Batch(waves, lengths, torch.randint(0, 2, (size,), generator=generator),
                         [f"r{rank}s{step}i{i}" for i in range(size)], [{} for _ in range(size)]))
    return out


class _Counting:
    """A collective helper as the step module imported it, counting its calls."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def _run(mode: str, loader_counts: bool, overlap: bool, rank: int) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    import posttrain.train.step as step_module
    from posttrain.config import load_config
    from posttrain.data.stream import _agree
    from posttrain.models.detector import build_detector
    from posttrain.train.trainer import build_optimizer, seed_everything
    from posttrain.train.engine_config import deepspeed_config
    from posttrain.train.schedule import build_scheduler
    from posttrain.train.step import StepContext, get_step_mode, make_augment

    cfg = load_config(None, [*MODES[mode], "train.zero_stage=2", "train.precision=fp32", "train.device=cpu",
                             "train.grad_accum_steps=2", "optim.lr=0.001", "schedule.warmup_steps=0",
                             f"train.overlap_comm={str(overlap).lower()}", "tracking.enabled=false"])
    seed_everything(0)
    model = build_detector(cfg.model)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    ds_config = deepspeed_config(cfg)
    assert ds_config["zero_optimization"]["overlap_comm"] is overlap
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    ctx = StepContext(cfg=cfg, optimizer=optimizer, scheduler=scheduler, device=torch.device("cpu"),
                      world_size=WORLD_SIZE, augment=make_augment(cfg))
    step_fn = get_step_mode(mode)
    # the step module's own collectives: the counts fallback (all_reduce_sum) and finish_step (global_sums)
    counters = {name: _Counting(getattr(step_module, name)) for name in ("all_reduce_sum", "global_sums")}
    stats, calls = [], []
    for index in range(2):
        batches = _batches(rank, index)
        if loader_counts:
            for batch in batches:  # what ShardStream attaches: the join collective's sums
                batch.global_counts = _agree(None if batch.is_empty else batch)
        seed_everything(7 + rank)
        ctx.step = index
        for name, counter in counters.items():
            counter.calls = 0
            setattr(step_module, name, counter)
        try:
            result = step_fn(engine, batches, ctx)
        finally:
            for name, counter in counters.items():
                setattr(step_module, name, counter.real)
        calls.append(sum(counter.calls for counter in counters.values()))
        stats.append((result.loss, result.samples, result.audio_seconds, result.skipped, sorted(result.extra.items())))
    weights = torch.cat([safe_get_full_fp32_param(p).flatten() for p in engine.module.parameters()])
    engine.destroy()
    return {"weights": weights, "stats": stats, "calls": calls}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from posttrain.dist import start_process_group

    start_process_group(torch.device("cpu"), deepspeed=True)
    results = {}
    for mode in MODES:
        results[(mode, "own")] = _run(mode, loader_counts=False, overlap=False, rank=rank)
        results[(mode, "loader")] = _run(mode, loader_counts=True, overlap=False, rank=rank)
        if mode != "plain":
            results[(mode, "overlap")] = _run(mode, loader_counts=True, overlap=True, rank=rank)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("collectives") / "results.pt")
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD_SIZE, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_loader_agreed_counts_are_bit_identical_and_leave_one_collective(results, mode):
    own, loader = results[(mode, "own")], results[(mode, "loader")]
    assert torch.equal(own["weights"], loader["weights"])
    assert own["stats"] == loader["stats"]
    assert [s[1] for s in loader["stats"]] == [6, 6]  # 2 + 3 + 1 samples per step, the join batch adds none
    assert loader["calls"] == [1, 1] and own["calls"] == [2, 2]
    extra = dict(loader["stats"][0][4])
    if mode == "sam":
        assert extra["sam/loss_increase"] > 0  # reduced in the same collective: a real ascent on the mean
    if mode == "dual_path":
        assert extra["dual_path/loss_aug"] > 0


@pytest.mark.parametrize("mode", ["sam", "dual_path"])
def test_overlap_comm_gives_the_same_weights(results, mode):
    torch.testing.assert_close(results[(mode, "overlap")]["weights"], results[(mode, "loader")]["weights"],
                               rtol=0, atol=1e-7)
    assert results[(mode, "overlap")]["stats"][0][1] == 6
