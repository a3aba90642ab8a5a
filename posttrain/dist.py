"""Where this process sits: rank and world size, resolved explicitly."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

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
