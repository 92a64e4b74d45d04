"""Several processes, one job: PyTorch's own distributed engine, started by `torchrun`.

    torchrun --nproc_per_node 2 -m caproj.cli train ...   (or the `caproj` script's path)

Every rank holds the whole (tensor-resident) dataset and draws the same global batch (same seed,
same augmentation); rank r trains on rows r·b/W … (r+1)·b/W of it, and gradients are averaged
(DistributedDataParallel for fine-tuning, an all-reduce for CaP's proxies). With batch statistics
frozen (CaP, `--freeze-bn`) that is the single-process computation on the same global batch,
up to float summation order; with BatchNorm in training mode each rank normalises its own
shard, as DistributedDataParallel always does. Only rank 0 prints and writes files. gloo on CPU,
nccl on CUDA.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from caproj.errors import CaprojError


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes (no-op in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= n:  # more processes per node than GPUs: say so, not "invalid ordinal"
            raise CaprojError(f"torchrun started a process with local rank {local} but this "
                              f"machine has {n} CUDA device(s): start at most {n} per node "
                              f"(--nproc_per_node {n}), or run on the CPU (device 'cpu')",
                              param="device")
        torch.cuda.set_device(local)
    dist.init_process_group(backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def check_divisible(batch: int) -> None:
    w = world()
    if batch % w:
        raise CaprojError(f"batch of {batch} does not split evenly over {w} processes; "
                          f"use a batch size divisible by {w}")


def shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's equal share of a global batch (dim 0)."""
    w = world()
    if w == 1:
        return t
    check_divisible(len(t))
    n = len(t) // w
    return t[rank() * n:(rank() + 1) * n]


def all_reduce_(t: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or average) `t` over ranks, in place."""
    if world() > 1:
        dist.all_reduce(t)
        if average:
            t /= world()
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal seen by one of them)."""
    if world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0],
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item() > 0)


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over ranks (each rank's loss is its share of the global
    one), for loops that are not wrapped in DistributedDataParallel."""
    if world() > 1:
        for t in params:
            if t.grad is not None:
                dist.all_reduce(t.grad)
