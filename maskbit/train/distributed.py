"""Process-group setup for `torchrun` (gloo on CPU, NCCL on GPU) and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None            # "nccl" or "gloo" inside a process group, None for a plain process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def setup(device: str | None = None) -> DistInfo:
    """Pick the device; join the process group when launched by torchrun or with WORLD_SIZE > 1.

    Under torchrun the group is joined even by a single process, so `torchrun --nproc_per_node 1` runs the
    DistributedDataParallel and NCCL code of a multi-GPU run on one GPU (torchrun sets TORCHELASTIC_RUN_ID).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return DistInfo(rank, world, local, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev, dist.get_backend())


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, torch.Tensor], info: DistInfo) -> dict[str, float]:
    """Average scalar tensors over all ranks (one collective); returns floats."""
    if not values:
        return {}
    keys = sorted(values)
    # a stage may log host scalars next to device tensors: move each one, torch.stack needs a single device
    stacked = torch.stack([values[k].detach().float().reshape(()).to(info.device) for k in keys])
    if info.enabled:
        dist.all_reduce(stacked)
        stacked /= info.world_size
    return dict(zip(keys, stacked.cpu().tolist()))


def average_buffers(tensors: list[torch.Tensor], info: DistInfo) -> None:
    if info.enabled:
        for t in tensors:
            dist.all_reduce(t)
            t /= info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
