"""Multi-process training under ``torchrun``: process group, device per rank, DDP, global counts.

``torchrun --nproc_per_node=N train/run.py …`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the run
is a single process and every helper here is a no-op. Only rank 0 writes checkpoints, reports and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Context:
    """Where this process runs and which part of the job it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True for the one process that writes files and prints."""
        return self.rank == 0


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` = CUDA when available; under torchrun each process takes the GPU of its local rank."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_spec: str) -> Context:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world_size == 1:
        return Context(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(device, rank=dist.get_rank(), world_size=dist.get_world_size())


def teardown() -> None:
    """Leave the process group (no-op for a single process)."""
    global _host_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _host_group = None


#: A gloo group over every process, for the host-side collectives below when the default group is NCCL's (made
#: on first use).
_host_group: dist.ProcessGroup | None = None


def _host() -> dist.ProcessGroup | None:
    """The group of the host-side collectives: the default group when it is gloo's, else :data:`_host_group`."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo")
    return _host_group


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself for a single process). A collective call, over gloo
    on the host: it never waits for the device, so the training loop can agree on a stop request at every step."""
    if not dist.is_initialized():
        return flag
    votes = torch.tensor([float(flag)])
    dist.all_reduce(votes, group=_host())
    return votes.item() > 0


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (``obj`` itself for a single process). A collective call over gloo on the
    host, so the other processes may wait for rank 0's work alone (the final evaluation, minutes on a large test
    split) beyond NCCL's timeout, without holding a device."""
    if not dist.is_initialized():
        return obj
    received = [obj]
    dist.broadcast_object_list(received, src=0, group=_host())
    return received[0]


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module the training step calls: DDP over ``model`` under torchrun, else ``model`` itself."""
    if not ctx.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)


def share_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (batch-norm statistics); a collective call, no-op for one process. DDP
    broadcasts them before each training forward and every process then updates its own copy with its own batch,
    so after the last step they differ: before the processes evaluate together, they must hold rank 0's model, the
    one the entry is made of."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (no-op for a single process) and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """``obj`` of every process, in rank order (``[obj]`` for a single process); a collective call."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every process (no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()
