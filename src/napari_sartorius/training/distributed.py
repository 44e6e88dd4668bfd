"""Multi-process training through ``torchrun`` (DistributedDataParallel).

Launched as ``torchrun --nproc_per_node=N -m napari_sartorius.cli train ...``, every process sees
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. :func:`init_from_env` then joins the
process group (NCCL on CUDA, one GPU per process chosen by ``LOCAL_RANK``; Gloo on CPU), the trainer
wraps the model in DDP, each process trains on its own share of every batch (see the trainer's
``_Plan``), and only rank 0 writes checkpoints, validates and should print. Without ``torchrun``
(``WORLD_SIZE`` unset or 1) nothing here does anything.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "world_size_from_env", "init_from_env", "is_main_process", "wrap_model", "sync_batchnorm", "unwrap", "no_sync", "any_rank", "barrier", "cleanup"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run.

    Attributes:
        world_size: number of processes.
        rank: this process's global rank (0 writes files).
        local_rank: its rank on this machine (the GPU it uses).
        backend: "nccl" or "gloo".
        device: the device this process trains on.
    """

    world_size: int
    rank: int
    local_rank: int
    backend: str
    device: torch.device


def world_size_from_env() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset or not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str = "auto") -> DistContext | None:
    """Join the process group when launched by ``torchrun`` with more than one process, else None.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda"; under torchrun each CUDA process uses
            GPU ``LOCAL_RANK``.

    Raises:
        RuntimeError: ``WORLD_SIZE > 1`` but ``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` are missing (not
            launched by torchrun), or more processes than GPUs on this machine.
    """
    world = world_size_from_env()
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch multi-process training with torchrun"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "use --nproc_per_node <= the number of GPUs"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(world, rank, local_rank, backend, dev)


def is_main_process() -> bool:
    """True outside distributed runs and on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers (the ResNeSt architectures' body, FPN and heads) turned into
    ``SyncBatchNorm`` when ``device`` is a GPU, as detectron2's SyncBN: statistics over the images of
    all processes, same parameters and state-dict names; FrozenBN stays frozen. PyTorch's SyncBatchNorm
    runs on GPUs only: on CPU (gloo) each process keeps plain BatchNorm over its own images."""
    if device.type == "cuda" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel on ``ctx.device``.

    ``find_unused_parameters`` is on: a batch without any cell leaves the mask branch out of the graph.
    BatchNorm layers become ``SyncBatchNorm`` on GPUs (:func:`sync_batchnorm`).
    """
    model = sync_batchnorm(model, ctx.device)
    model.to(ctx.device)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module):
    """DDP's ``no_sync`` (skip the gradient all-reduce of an accumulation micro-step); a no-op otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def any_rank(flag: bool, ctx: DistContext | None) -> bool:
    """True when ``flag`` is true on any process (e.g. a stop request seen by rank 0 only), so that all
    ranks leave the loop together instead of waiting for each other forever."""
    if ctx is None or not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(ctx: DistContext | None) -> None:
    if ctx is not None and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
