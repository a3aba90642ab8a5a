"""Where this process sits (rank, world size, device) and the few collectives every floor shares.

One home for the process-group helpers: the one initialiser (``start_process_group``, and the
``process_group`` context of the inference commands), whether a group is up, the world group,
``process_rank``, barrier, the sums of per-rank partials (``global_sums``, ``all_reduce_sum``), every
rank's vector (``gather_vectors``), and the device chooser. Each collective is a no-op alone (no process
group)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info(rank: int | None = None, world_size: int | None = None) -> DistInfo:
    """Explicit arguments win, then an initialised process group, then torchrun/SLURM variables."""
    if rank is not None and world_size is not None:
        return DistInfo(rank, world_size, int(os.environ.get("LOCAL_RANK", 0)))
    if torch_dist.is_available() and torch_dist.is_initialized():
        return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    env_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    env_world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    env_local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    info = DistInfo(int(env_rank), int(env_world), int(env_local))
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size}")
    return info


def free_port() -> int:
    """A TCP port free on this host now, for a single-node rendezvous (tests, one-machine runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gather_vectors(values: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``values`` (lengths may differ), in rank order: two all_gathers (the lengths,
    then the values padded to the longest). Collective; without a process group ``[values]``."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return [values]
    world = torch_dist.get_world_size()
    count = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    torch_dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch_dist.all_gather(gathered, padded)
    return [g[:n] for g, n in zip(gathered, sizes)]


# ---------------------------------------------------------------------------------- process group


def backend_for(device: torch.device) -> str:
    """NCCL for a CUDA device, gloo otherwise (CPU runs and the multi-process tests)."""
    return "nccl" if device.type == "cuda" else "gloo"


def start_process_group(device: torch.device, *, deepspeed: bool) -> bool:
    """The one process-group initialiser (training, fine-tuning, benches, eval, score, embed,
    sharpness), backend from ``backend_for(device)``; nothing starts when a group is already up (e.g.
    accelerate's). Returns whether this call started the group (its caller then owns its teardown).

    ``deepspeed=True`` (training): DeepSpeed needs a group even in a plain ``python`` run, which becomes
    a world of one on a free local port, and its comm layer must know the group, so DeepSpeed starts it.
    DeepSpeed picks its accelerator when first imported, hence the environment first.
    ``deepspeed=False`` (inference commands): plain torch.distributed, and only under a launcher
    (``WORLD_SIZE > 1``); a single process stays without a group."""
    if deepspeed:
        _prepare_deepspeed(device)
    elif int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if is_initialized():
        return False
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend_for(device), auto_mpi_discovery=False)
    else:
        torch_dist.init_process_group(backend_for(device))
    return True


def _prepare_deepspeed(device: torch.device) -> None:
    """DeepSpeed's accelerator, a world of one outside a launcher, and the current CUDA device."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory kernel (about 2 minutes on two
        # cores) that only its *inference* all-reduce uses; training collectives go through
        # torch.distributed (gloo). Marking the op incompatible makes the backend skip the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if device.type == "cuda":
        torch.cuda.set_device(device)


def end_process_group() -> None:
    """After a command's last collective: wait for every rank, then take the group down. A rank that exits
    with its group up can abort a slower rank's gloo threads at exit ("terminate called without an active
    exception", SIGABRT), and a finished job would then end FAILED (or a stopped one not be requeued)."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[DistInfo]:
    """A process group for the duration of an inference command run under torchrun
    (``WORLD_SIZE > 1``): NCCL when CUDA is visible, gloo otherwise, destroyed on exit. Nothing is
    started for a single process or an existing group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = start_process_group(device, deepspeed=False)
    try:
        yield dist_info()
    finally:
        if started:
            torch_dist.destroy_process_group()


# ------------------------------------------------------------------------------------ collectives


def is_initialized() -> bool:
    """A process group is up (every collective below is then a real one)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_group() -> Any:
    """The default group when a process group is up, else None (sums are then local)."""
    return torch_dist.group.WORLD if is_initialized() else None


def process_rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def process_world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (one broadcast on ``device``; alone: the flag)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    if process_world_size() > 1:
        torch_dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def all_gather_objects(item: Any) -> list[Any]:
    """Every rank's picklable ``item``, in rank order (one all_gather_object; alone: ``[item]``)."""
    world = process_world_size()
    if world == 1:
        return [item]
    gathered: list[Any] = [None] * world
    torch_dist.all_gather_object(gathered, item)
    return gathered


def collective_device() -> torch.device:
    """Where a collective's tensors live: NCCL reduces on the current CUDA device, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else torch.device("cpu")


def global_sums(partials: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum a small vector of per-rank partial sums over ``group`` (one all-reduce; ``None``: every rank
    holds everything, return as is). Returns a new tensor."""
    total = partials.clone()
    if group is not None and is_initialized():
        torch_dist.all_reduce(total, op=torch_dist.ReduceOp.SUM, group=group)
    return total


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Per-rank numbers summed over every rank, in float64 (one all-reduce; alone: the numbers)."""
    return global_sums(torch.tensor(list(values), dtype=torch.float64, device=device), world_group()).tolist()


# ------------------------------------------------------------------------------------------ devices


def choose_device(want: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device of this process: ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is visible, else the CPU;
    ``cuda`` without a visible GPU is an error naming the setting. A CUDA device becomes the current
    one (object collectives on NCCL use it)."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda requested but no CUDA device is visible")
    if want != "cuda":
        return torch.device(want)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank)
    torch.cuda.set_device(device)
    return device
