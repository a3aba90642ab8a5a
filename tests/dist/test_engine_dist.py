"""The training engine in real process groups (gloo, DS_ACCELERATOR=cpu, spawned ranks) on real shards.

Each spawned job runs several ``train(cfg)`` calls in one process group to pay the interpreter and
import start-up once. A test-only step mode (``probe``) wraps the plain step: it records what every
rank trained on, snapshots the fp32 master weights and Adam moments, and injects crashes and NaNs.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from posttrain.config import load_config
from posttrain.data.batch import normalize_waveforms
from posttrain.data.shard_set import ShardSet
from posttrain.dist import free_port
from posttrain.models.detector import build_detector
from posttrain.train.checkpoint import consolidate_fp32, load_detector_from_checkpoint, read_metadata, read_pointer
from posttrain.train.trainer import seed_everything
from posttrain.train.schedule import lr_factor
from posttrain.train.step import plain_step, register_step_mode

pytestmark = [pytest.mark.dist, pytest.mark.slow]

PROBE: dict = {}  # set inside the spawned ranks before each train() call


class InjectedCrash(RuntimeError):
    pass


def _snapshot(engine) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Full fp32 master weights and Adam moments (collective under ZeRO-3: same order everywhere)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = [p for p in engine.module.parameters() if p.requires_grad]
    master = torch.cat([safe_get_full_fp32_param(p).flatten() for p in params])
    moments = [safe_get_full_optimizer_state(p, key) for p in params for key in ("exp_avg", "exp_avg_sq")]
    return master, None if any(m is None for m in moments) else torch.cat([m.flatten() for m in moments])


@register_step_mode("probe")
def probe_step(engine, micro_batches, ctx):
    step, rank = ctx.step + 1, dist.get_rank()
    if PROBE.get("crash_at") == step:
        raise InjectedCrash(f"injected crash at step {step}")
    if rank in PROBE.get("signal_at", {}).get(step, ()):  # as the batch shell's forwarded warning would
        os.kill(os.getpid(), signal.SIGUSR1)
    injected = None
    if rank in PROBE.get("nan_loss_at", {}).get(step, ()):
        batch = next((b for b in micro_batches if not b.is_empty), None)
        if batch is not None:
            batch.waveforms = batch.waveforms.clone()
            batch.waveforms[0, :10] = float("nan")
            injected = "loss"
    hook = None
    if rank in PROBE.get("nan_grad_at", {}).get(step, ()):
        hook = engine.module.head.weight.register_hook(lambda grad: grad * float("nan"))
        injected = "grad"
    if PROBE.get("save_batches"):
        torch.save([(b.waveforms, b.lengths, b.labels) for b in micro_batches],
                   Path(PROBE["dir"]) / f"batches-{PROBE['name']}-r{rank}-s{step:04d}.pt")
    before = PROBE.get("prev")
    stats = plain_step(engine, micro_batches, ctx)
    if hook is not None:
        hook.remove()
    master, moments = _snapshot(engine)
    record = {"rank": rank, "step": step, "epoch": ctx.epoch, "ids": [i for b in micro_batches for i in b.ids],
              "joins": sum(b.is_empty for b in micro_batches), "skipped": stats.skipped, "loss": stats.loss,
              "lr": stats.lr, "grad_norm": stats.grad_norm, "samples": stats.samples, "injected": injected,
              "master_changed": before is None or not torch.equal(before[0], master),
              "moments_changed": before is None or before[1] is None or moments is None
              or not torch.equal(before[1], moments),
              "master_finite": bool(torch.isfinite(master).all())}
    PROBE["prev"] = (master, moments)
    with open(Path(PROBE["dir"]) / f"steps-{PROBE['name']}-r{rank}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return stats


def _cfg(shards, out, *overrides):
    train_dir, valid_dir = shards
    return load_config(None, [
        f"output_dir={out}", "model.preset=tiny", f"data.train.shards=[{train_dir}]", f"data.valid.shards=[{valid_dir}]",
        "data.train.max_batch_seconds=2.0", "data.train.num_workers=0", "data.train.crop.policy=none",
        "data.valid.crop.policy=none", "data.valid.max_batch_seconds=4.0", "optim.lr=0.001",
        "schedule.warmup_steps=2", "schedule.decay_end_steps=30", "train.precision=fp32", "train.max_epochs=2",
        "train.max_steps=1000", "train.log_every_steps=1", "train.valid_every_steps=0", "checkpoint.every_steps=0",
        "checkpoint.every_minutes=0", "checkpoint.keep_last=50", "tracking.enabled=false", "train.step_mode=probe",
        *overrides])


def _run(name, cfg, probe_dir, **probe):
    from posttrain.train.trainer import train

    PROBE.clear()
    PROBE.update(dir=str(probe_dir), name=name, **probe)
    return train(cfg)


def _signal_inside_save(rank_to_signal, at_step):
    """Wrap the checkpoint writer so ``rank_to_signal`` gets SIGUSR1 after DeepSpeed's files and before
    the metadata and the ``latest`` pointer: a warning that lands in the middle of a write."""
    from posttrain.train import checkpoint as ckpt

    save, rng_state = ckpt.save_checkpoint, ckpt.rng_state
    armed = []

    def armed_save(engine, root, tag, metadata, *args, **kwargs):
        armed[:] = [dist.get_rank() == rank_to_signal and metadata["progress"]["step"] == at_step]
        return save(engine, root, tag, metadata, *args, **kwargs)

    def signalling_rng_state():
        if armed == [True]:
            os.kill(os.getpid(), signal.SIGUSR1)
        return rng_state()

    ckpt.save_checkpoint, ckpt.rng_state = armed_save, signalling_rng_state
    return lambda: (setattr(ckpt, "save_checkpoint", save), setattr(ckpt, "rng_state", rng_state))


def _result(probe_dir, name, **values):
    if dist.get_rank() == 0:
        (Path(probe_dir) / f"result-{name}.json").write_text(json.dumps(values))


# ------------------------------------------------------------------------------------ rank programs


def _zero2_program(shards, work):
    """ZeRO-2 fp32: uninterrupted run (A), stop at the epoch end + resume (B), crash mid-epoch right
    after a checkpoint + resume to A's end (C), NaN injection (D)."""
    from posttrain.train.trainer import NonFiniteTrainingError

    tracking = ["tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
                "tracking.system_metrics=false"]
    a = _run("A", _cfg(shards, work / "A", *tracking), work, save_batches=True)
    _result(work, "A", run_id=a.mlflow_run_id, steps=a.progress.step)
    b1 = _run("B1", _cfg(shards, work / "B", "train.max_epochs=1", *tracking), work)
    b2 = _run("B2", _cfg(shards, work / "B", *tracking), work)
    _result(work, "B", run_ids=[b1.mlflow_run_id, b2.mlflow_run_id], steps=[b1.progress.step, b2.progress.step])
    try:
        _run("C1", _cfg(shards, work / "C", "checkpoint.every_steps=2", "train.max_epochs=1"), work, crash_at=5)
    except InjectedCrash:
        pass
    _run("C2", _cfg(shards, work / "C"), work)
    _signal_program_part(shards, work, total_steps=a.progress.step)
    try:
        _run("D", _cfg(shards, work / "D", "train.max_consecutive_skips=3", "train.max_epochs=3"), work,
             nan_loss_at={2: [0], 5: [0, 1], 6: [0, 1]}, nan_grad_at={4: [1]})
        _result(work, "D", error=None)
    except NonFiniteTrainingError as error:
        _result(work, "D", error=str(error))


def _signal_program_part(shards, work, total_steps):
    """S: SIGUSR1 on rank 0 in the middle of the step-2 periodic checkpoint (S1 stops after step 3), then
    on rank 1 during step ``total_steps - 2`` of the resumed run (S2), then S3 runs to A's end."""
    stops = []
    restore = _signal_inside_save(rank_to_signal=0, at_step=2)
    try:
        s1 = _run("S1", _cfg(shards, work / "S", "checkpoint.every_steps=2"), work)
    finally:
        restore()
    stops.append(s1.stopped and vars(s1.stopped))
    s2 = _run("S2", _cfg(shards, work / "S"), work, signal_at={total_steps - 2: [1]})
    stops.append(s2.stopped and vars(s2.stopped))
    s3 = _run("S3", _cfg(shards, work / "S"), work)
    stops.append(s3.stopped)
    _result(work, "S", stops=stops, stopped_file_after=(work / "S" / "stopped.json").exists(),
            steps=[s1.progress.step, s2.progress.step, s3.progress.step])


def _zero3_program(shards, work):
    """ZeRO-3 bf16 with activation checkpointing, validation every 3 steps and one NaN step."""
    _run("Z3", _cfg(shards, work / "Z3", "train.zero_stage=3", "train.precision=bf16",
                    "model.gradient_checkpointing=true", "train.valid_every_steps=3", "train.grad_accum_steps=2",
                    "optim.lr=0.003", "train.max_epochs=3"), work, nan_loss_at={3: [1]})


def _universal_program(shards, work):
    """World size 1 resuming the world-size-2 ZeRO-2 checkpoint of run A (epoch 1 end)."""
    source = work / "A" / "checkpoints"
    target = work / "U"
    target.mkdir()
    _run("U", _cfg(shards, target, f"checkpoint.resume={source}", "train.max_epochs=3"), work)


def _rank_main(rank, world_size, port, program, shards, work):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    globals()[program](shards, Path(work))


def _spawn(program, world_size, shards, work):
    mp.spawn(_rank_main, args=(world_size, free_port(), program, tuple(str(s) for s in shards), str(work)),
             nprocs=world_size, join=True)


def _steps(work, name, rank=None):
    rows = []
    for path in sorted(Path(work).glob(f"steps-{name}-r*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if rank is None or r["rank"] == rank]


def _weights(path):
    state, metadata = consolidate_fp32(path)
    return state, metadata


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


@pytest.fixture(scope="module")
def shards(shard_dir, valid_shard_dir):
    return shard_dir, valid_shard_dir


@pytest.fixture(scope="module")
def zero2(shards, tmp_path_factory):
    work = tmp_path_factory.mktemp("zero2")
    _spawn("_zero2_program", 2, shards, work)
    return work


def _all_ids(directory):
    """Sample ids of a shard set, read from its tars' JSON members (independent of the loader)."""
    import tarfile

    ids = []
    for shard in ShardSet.load(directory).shards:
        with tarfile.open(shard.path) as tar:
            ids += [json.load(tar.extractfile(m))["id"] for m in tar.getmembers() if m.name.endswith(".json")]
    return ids


# ------------------------------------------------------------------------------------------- tests


def test_zero2_trains_like_a_single_process_reference(zero2, shards):
    """Run A's first epoch equals plain PyTorch AdamW on the mean loss over each step's global
    samples (join batches included: uneven shards leave one rank without data at the end)."""
    rows = _steps(zero2, "A")
    epoch0_steps = sorted({r["step"] for r in rows if r["epoch"] == 0})
    assert any(r["joins"] for r in rows if r["epoch"] == 0), "the uneven shards should produce join batches"
    cfg = _cfg(shards, zero2 / "ref")
    seed_everything(cfg.train.seed)
    model = build_detector(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    for index, step in enumerate(epoch0_steps):
        batches = [b for rank in (0, 1) for b in torch.load(zero2 / f"batches-A-r{rank}-s{step:04d}.pt")]
        total = sum(int(labels.numel()) for _, _, labels in batches)
        optimizer.zero_grad()
        # the probe saved the loader's raw audio; the step normalises it on the device
        loss = sum(F.cross_entropy(model(normalize_waveforms(w, n), n), y, reduction="sum")
                   for w, n, y in batches if y.numel()) / total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(index, cfg.schedule)
        optimizer.step()
    epoch_end = zero2 / "A" / "checkpoints" / f"step-{epoch0_steps[-1]:08d}"
    state, metadata = _weights(epoch_end)
    assert metadata["progress"]["epoch"] == 1
    reference = {k: v for k, v in model.state_dict().items() if k in state}
    assert reference.keys() == state.keys()
    assert _max_diff(state, reference) < 2e-5
    # and it learned something: the weights moved, the losses are finite
    assert all(r["master_finite"] and r["loss"] == r["loss"] for r in rows)


def test_stop_at_epoch_end_and_resume_gives_identical_weights(zero2):
    """B stops after its epoch-0 checkpoint and resumes in a new engine: same weights as A, same
    MLflow run continued."""
    a, _ = _weights(zero2 / "A" / "checkpoints")
    b, metadata = _weights(zero2 / "B" / "checkpoints")
    assert metadata["progress"]["epoch"] == 2
    assert _max_diff(a, b) <= 1e-6
    result_a = json.loads((zero2 / "result-A.json").read_text())
    result_b = json.loads((zero2 / "result-B.json").read_text())
    assert result_b["steps"][1] == result_a["steps"]
    run_ids = result_b["run_ids"]
    assert run_ids[0] and run_ids[0] == run_ids[1] != result_a["run_id"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{zero2}/mlflow.db")
    run = client.get_run(run_ids[0])
    losses = client.get_metric_history(run_ids[0], "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, result_a["steps"] + 1))
    assert run.data.params["train.zero_stage"] == "2" and run.info.status == "FINISHED"
    assert "valid/eer" in run.data.metrics and "train/audio_seconds_per_s" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_ids[0])}
    assert "config.yaml" in artifacts


def test_crash_after_checkpoint_resumes_every_sample_exactly_once(zero2, shards):
    """C crashes at step 5 (checkpoint at step 4), C2 resumes: the steps that reached a checkpoint
    plus the resumed ones cover the epoch's samples exactly once."""
    checkpoint_step = 4
    kept = [r for r in _steps(zero2, "C1") if r["step"] <= checkpoint_step]
    resumed = [r for r in _steps(zero2, "C2") if r["epoch"] == 0]
    assert resumed and min(r["step"] for r in resumed) == checkpoint_step + 1
    seen = [i for r in kept + resumed for i in r["ids"]]
    expected = _all_ids(shards[0])
    assert sorted(seen) == sorted(expected)
    assert len(set(seen)) == len(seen) == 12


def test_mid_epoch_resume_gives_identical_batches_and_weights(zero2):
    """C stopped right after its mid-epoch checkpoint (step 4) and resumed at the same world size and
    worker count: every step trains on the samples A's step did, per rank and in the same order, and
    the final fp32 weights equal the uninterrupted run's."""
    checkpoint_step = 4
    a_steps = {(r["rank"], r["step"]): r["ids"] for r in _steps(zero2, "A")}
    c_steps = {(r["rank"], r["step"]): r["ids"] for r in _steps(zero2, "C1") if r["step"] <= checkpoint_step}
    c_steps.update({(r["rank"], r["step"]): r["ids"] for r in _steps(zero2, "C2")})
    assert c_steps == a_steps
    a, _ = _weights(zero2 / "A" / "checkpoints")
    c, metadata = _weights(zero2 / "C" / "checkpoints")
    assert metadata["progress"]["epoch"] == 2 and metadata["progress"]["step"] == max(s for _, s in a_steps)
    assert _max_diff(a, c) <= 1e-6


def test_a_stop_signal_checkpoints_at_the_step_end_and_the_resumed_runs_end_identical(zero2):
    """SIGUSR1 to one rank, once in the middle of a checkpoint write and once mid-step: every rank stops
    after the same step with one collective checkpoint, ``stopped.json`` names it, and the two resumed
    runs train every step exactly once on the samples A's step did, ending with A's weights."""
    total = json.loads((zero2 / "result-A.json").read_text())["steps"]
    result = json.loads((zero2 / "result-S.json").read_text())
    first, second, third = result["stops"]
    assert first == {"signal": "SIGUSR1", "received_after_step": 2, "stopped_after_step": 3,
                     "checkpoint": "step-00000003"}
    assert second == {"signal": "SIGUSR1", "received_after_step": total - 3, "stopped_after_step": total - 2,
                      "checkpoint": f"step-{total - 2:08d}"}
    assert third is None and not result["stopped_file_after"]
    assert result["steps"] == [3, total - 2, total]
    # the step-2 checkpoint the signal interrupted is complete and was kept; nothing half-written anywhere
    root = zero2 / "S" / "checkpoints"
    assert read_metadata(root / "step-00000002")["progress"]["step"] == 2
    assert read_pointer(root) == f"step-{total:08d}"
    runs = [{(r["rank"], r["step"]): r["ids"] for r in _steps(zero2, name)} for name in ("S1", "S2", "S3")]
    assert [sorted({step for _, step in run}) for run in runs] == [
        [1, 2, 3], list(range(4, total - 1)), list(range(total - 1, total + 1))]
    merged = {key: ids for run in runs for key, ids in run.items()}
    assert merged == {(r["rank"], r["step"]): r["ids"] for r in _steps(zero2, "A")}
    a, _ = _weights(zero2 / "A" / "checkpoints")
    s, _ = _weights(root)
    assert _max_diff(a, s) == 0.0


def test_non_finite_steps_are_skipped_on_every_rank_and_stop_training(zero2):
    rows = _steps(zero2, "D")
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    assert [r["injected"] for r in sorted(by_step[2], key=lambda r: r["rank"])] == ["loss", None]
    assert [r["injected"] for r in sorted(by_step[4], key=lambda r: r["rank"])] == [None, "grad"]
    for step, expect_skip in [(1, False), (2, True), (3, False), (4, True), (5, True), (6, True)]:
        assert [r["skipped"] for r in by_step[step]] == [expect_skip, expect_skip], step
        for r in by_step[step]:
            # a skipped step leaves fp32 master weights and Adam moments bit-identical
            assert r["master_changed"] is (not expect_skip) and r["moments_changed"] is (not expect_skip), step
            assert r["master_finite"]
    # the schedule does not advance on a skipped step
    assert by_step[3][0]["lr"] == by_step[2][0]["lr"]
    assert 7 not in by_step
    error = json.loads((zero2 / "result-D.json").read_text())["error"]
    assert error and "3 consecutive non-finite steps" in error and "step 6" in error


def test_universal_resume_at_world_size_one(zero2, shards):
    _spawn("_universal_program", 1, shards, zero2)
    rows = _steps(zero2, "U")
    source, _ = _weights(zero2 / "A" / "checkpoints")
    assert rows and rows[0]["step"] == json.loads((zero2 / "result-A.json").read_text())["steps"] + 1
    assert {r["epoch"] for r in rows} == {2}
    assert sorted(i for r in rows for i in r["ids"]) == sorted(_all_ids(shards[0]))
    final, metadata = _weights(zero2 / "U" / "checkpoints")
    assert metadata["world_size"] == 1 and metadata["progress"]["epoch"] == 3
    assert 0 < _max_diff(final, source) < 1.0 and all(torch.isfinite(v).all() for v in final.values())
    # the first resumed step used the schedule where the ws-2 run left it
    a_steps = json.loads((zero2 / "result-A.json").read_text())["steps"]
    cfg = _cfg(shards, zero2 / "x")
    assert rows[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(a_steps, cfg.schedule), rel=1e-9)


def test_zero3_bf16_trains_validates_and_exports(shards, tmp_path):
    _spawn("_zero3_program", 2, shards, tmp_path)
    rows = _steps(tmp_path, "Z3")
    skipped = {r["step"] for r in rows if r["skipped"]}
    assert skipped == {3}
    applied = [r for r in rows if not r["skipped"] and r["rank"] == 0]
    assert all(r["master_changed"] for r in applied) and all(r["master_finite"] for r in rows)
    root = tmp_path / "Z3" / "checkpoints"
    best = read_pointer(root, "best")
    latest = read_pointer(root, "latest")
    assert best and latest and (root / best / "posttrain.json").is_file()
    metadata = read_metadata(root / latest)
    assert metadata["progress"]["best_valid_eer"] is not None and metadata["zero_stage"] == 3
    # the exported detector reproduces the engine's fp32 master weights and runs offline
    detector, _ = load_detector_from_checkpoint(root)
    state, _ = consolidate_fp32(root)
    assert _max_diff({k: v for k, v in detector.state_dict().items() if k in state}, state) == 0
    # it learns: the mean training loss of the last epoch is below the first epoch's
    epochs = {}
    for r in applied:
        epochs.setdefault(r["epoch"], []).append(r["loss"])
    means = [sum(v) / len(v) for _, v in sorted(epochs.items())]
    assert len(means) == 3 and means[-1] < means[0], epochs
