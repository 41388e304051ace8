"""Multi-process data parallel (torchrun): joining the process group and the few collectives training uses.

Every collective runs on tensors on the training device, as NCCL requires on CUDA (gloo takes CPU tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..errors import Gpt2LoadError
from ..model.build import pick_device
from ..settings import Settings

T = TypeVar("T")


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(
    device: str | torch.device | None = None, settings: Settings | None = None
) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA (with gloo for
    CPU tensors), one GPU per local rank. Returns (rank, world_size, device); a single process gets (0, 1, the
    chosen device)."""
    dev = pick_device(device)
    settings = settings or Settings.from_env()  # torchrun's variables
    world = int(settings.number("WORLD_SIZE", 1, 1, whole=True))
    if world <= 1:
        return 0, 1, dev
    local = int(settings.number("LOCAL_RANK", 0, 0, whole=True))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise Gpt2LoadError(f"multi-process training runs on cpu or cuda, not {dev.type}: pass --device cpu")
    if not dist.is_initialized():
        # on GPUs, NCCL for CUDA tensors and gloo for CPU ones (FSDP's --cpu-offload shards, gradients and norms)
        dist.init_process_group("cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        # everyone arrives first: a process that tears its connections down while a peer is still in a
        # collective makes gloo's I/O thread abort that peer
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 first (e.g. writing a cache), then on the other ranks; an error on rank 0 is raised
    on every rank instead of leaving the others waiting."""
    rank, world = dist_info()
    if world == 1:
        return fn()
    result, failure = None, [None]
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:
            failure = [str(e) if isinstance(e, Gpt2LoadError) else f"rank 0 failed: {type(e).__name__}: {e}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise Gpt2LoadError(failure[0])
    return fn() if rank != 0 else result  # type: ignore[return-value]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of `values` over every process (float64 where the device has it)."""
    _, world = dist_info()
    if world == 1:
        return values
    dtype = torch.float32 if device.type == "mps" else torch.float64
    t = torch.tensor(values, dtype=dtype, device=device)  # on the training device: NCCL needs it there
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    """Wait for every process (nothing to wait for in one process)."""
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """`obj` as process `src` has it, on every process."""
    _, world = dist_info()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: T) -> list[T]:
    """Every process's `obj`, in rank order, on every process."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


__all__ = ["all_sum", "barrier", "broadcast", "dist_info", "gather", "init_distributed", "rank0_first", "shutdown"]
