"""Training a model larger than one device holds: FSDP2 (`torch.distributed.fsdp.fully_shard`) with one unit per
TransformerBlock plus the root, its mixed-precision and CPU-offload policies, activation checkpointing per block,
and the trained model gathered onto rank 0 for saving.

The model's code is untouched: sharding swaps its parameters for DTensor shards, and activation checkpointing
wraps each block's forward from the outside for the run only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import Gpt2LoadError
from ..model.gpt import GPTModel

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str, cpu_offload: bool, world: int) -> None:
    """One clear line for a strategy that cannot apply to this run."""
    if strategy not in STRATEGIES:
        raise Gpt2LoadError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if cpu_offload and strategy != "fsdp":
        raise Gpt2LoadError("--cpu-offload moves FSDP's shards to the CPU: it needs --strategy fsdp")
    if strategy == "fsdp" and world == 1:
        raise Gpt2LoadError(
            "--strategy fsdp shards the model across processes: run under torchrun --nproc_per_node N "
            "(a single process trains unsharded: leave --strategy out)"
        )


def is_sharded(model: nn.Module) -> bool:
    """True once `fully_shard` has been applied to the model (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model`'s structure with every parameter on the meta device (no memory), ties kept: what the
    full weights are loaded into on rank 0 after training. Buffers are copied (they are small)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


def shard_model(model: GPTModel, amp: torch.dtype, device: torch.device, cpu_offload: bool = False) -> None:
    """Apply FSDP2 in place: each TransformerBlock is one unit, the root (embeddings, final norm, head) another.

    bfloat16 runs compute and reduce gradients in bfloat16 while the shards (the master weights) and the
    optimizer state stay float32. A tied head is the embedding's Parameter, so it lives in the root unit and is
    sharded once; the tie is checked afterwards.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    tied = model.out_head.weight is model.tok_emb.weight if hasattr(model.out_head, "weight") else False
    mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=amp) if amp != torch.float32 else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    units = [*model.trf_blocks, model]
    for unit in units:
        fully_shard(unit, mp_policy=mp, offload_policy=offload)
    world = dist.get_world_size()
    for unit in units:
        # Sum, then divide by the world size ourselves: a backend's AVG reduction is not trusted (PyTorch issue
        # 162338 summed instead of averaging with gloo), and DDP's mean is what the loss scaling assumes.
        unit.set_force_sum_reduction_for_comms(True)
        unit.set_gradient_divide_factor(float(world))
    if tied and model.out_head.weight is not model.tok_emb.weight:
        raise Gpt2LoadError("fully_shard split the tied head from the token embedding (a bug): please report it")


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation and sampling keep nothing for a backward anyway
        return forward(*args, **kwargs)
    # Dropout draws the same masks again in the recomputation: checkpoint restores the RNG state
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def checkpointed_blocks(model: GPTModel, enabled: bool = True) -> Iterator[None]:
    """Activation checkpointing per TransformerBlock for the duration: a block keeps only its input for the
    backward and recomputes the rest. Each block's forward is wrapped on the instance and restored at exit, so
    the model's code, names and state_dict are unchanged."""
    blocks = list(model.trf_blocks) if enabled else []
    for block in blocks:
        block.forward = partial(_checkpointed, block.forward)
    try:
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def gather_tensor(t: torch.Tensor) -> torch.Tensor | None:
    """The whole of a DTensor sharded on dim 0, on rank 0's CPU (None on the other ranks); a plain tensor as is.

    The padded shards are all-gathered (the collective FSDP itself gathers with) and the other ranks drop the
    result at once: with gloo, `dist.gather` and DTensor.full_tensor() made processes abort at exit now and
    then (torch 2.13)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach().cpu() if dist.get_rank() == 0 else None
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [len(c) for c in torch.empty(t.shape[0], device="meta").chunk(world)]  # FSDP's uneven dim-0 split
    sizes += [0] * (world - len(sizes))
    local = t.to_local()
    padded = local.new_zeros((max(sizes), *t.shape[1:]))
    padded[: local.shape[0]] = local
    out = padded.new_empty((world * max(sizes), *t.shape[1:]))
    dist.all_gather_into_tensor(out, padded)
    if rank != 0:
        return None
    parts = out.chunk(world)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).cpu()


def gather_full(model: nn.Module, skeleton: nn.Module) -> nn.Module | None:
    """The trained weights of a sharded `model` as a plain module on rank 0's CPU (None on the other ranks).

    Every rank takes part: the shards are gathered one tensor at a time and only rank 0 keeps each whole
    tensor (on the CPU), so no rank ever holds a second full copy on the device. `skeleton` is `meta_skeleton`
    of the model taken before sharding."""
    state = {}
    for name, t in model.state_dict().items():  # the same order on every rank
        whole = gather_tensor(t)
        if whole is not None:
            state[name] = whole
    if dist.get_rank() != 0:
        return None
    tied = getattr(getattr(skeleton, "out_head", None), "weight", None) is getattr(skeleton, "tok_emb", None).weight
    if tied:
        state.pop("out_head.weight", None)  # the tie is restored by identity below, never by equal values
    missing, unexpected = nn.Module.load_state_dict(skeleton, state, strict=False, assign=True)
    if tied:
        skeleton.out_head.weight = skeleton.tok_emb.weight
        missing = [k for k in missing if k != "out_head.weight"]
    if missing or unexpected:
        raise Gpt2LoadError(f"the gathered weights do not fit the model ({(missing + unexpected)[:3]}): a bug")
    return skeleton


__all__ = [
    "STRATEGIES",
    "check_strategy",
    "checkpointed_blocks",
    "gather_full",
    "gather_tensor",
    "is_sharded",
    "meta_skeleton",
    "shard_model",
]
