"""What a training run needs per process, before it allocates it: weights, gradients, AdamW state, the working
copies FSDP gathers, and activations, for a strategy, dtype and batch; a run that cannot fit its device is
refused with the flags that would make it fit.

Weights and optimizer state are exact counts; activations are an estimate from what autograd saves, measured
with saved-tensor hooks on the 124M shape: per token and block, 64 bytes per embedding value in float32 (the
book's unfused LayerNorm and GELU keep their intermediates), 104 under bfloat16 autocast (it keeps float32 and
bfloat16 copies), 32 more with dropout (its masks); per token, the logits and the loss's log-softmax.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import Gpt2LoadError
from .distributed import gather
from .evaluation import eval_batches

BLOCK_BYTES = {torch.float32: 64, torch.bfloat16: 104}  # per token and block, × emb_dim (see above)
DROPOUT_BYTES = 32  # per token and block, × emb_dim, when the drop rate is above 0
GB = 1e9


@dataclass(frozen=True)
class Plan:
    """A run's shape for the estimate: strategy ("ddp" or "fsdp"), processes, autocast dtype, micro-batch."""

    strategy: str
    world: int
    dtype: torch.dtype
    batch: int
    tokens: int
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    def flags(self) -> str:
        parts = [f"--strategy {self.strategy}"] if self.world > 1 else []
        parts += ["--activation-checkpointing"] if self.activation_checkpointing else []
        parts += ["--cpu-offload"] if self.cpu_offload else []
        return " ".join([*parts, f"--dtype {str(self.dtype).removeprefix('torch.')}", f"--batch-size {self.batch}"])


@dataclass(frozen=True)
class Estimate:
    """Bytes per process on the training device (host memory for what --cpu-offload moves there)."""

    weights: float
    gradients: float
    optimizer: float
    working: float  # DDP's gradient buckets and autocast's weight copies, or FSDP's gathered units
    activations: float
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.working + self.activations

    def line(self, plan: Plan, capacity: float | None) -> str:
        working = "gathered units" if plan.strategy == "fsdp" and plan.world > 1 else "buckets and casts"
        parts = [
            f"weights {_gb(self.weights)}",
            f"gradients {_gb(self.gradients)}",
            f"optimizer {_gb(self.optimizer)}",
            *([f"{working} {_gb(self.working)}"] if self.working else []),
            f"activations {_gb(self.activations)}",
        ]
        host = f", plus {_gb(self.host)} offloaded to the CPU" if self.host else ""
        of = f" of {_gb(capacity)}" if capacity else ""
        return f"memory per process (estimate): {', '.join(parts)}; total {_gb(self.total)}{of}{host}"


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.01 * GB else f"{n / 1e6:.1f} MB"


def _numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def estimate(model: nn.Module, plan: Plan) -> Estimate:
    """The per-process memory of training `model` (a GPTModel, real or on the meta device) under `plan`.

    Args:
        model: its parameters' requires_grad says what trains (set freezing/LoRA first).
        plan: strategy, processes, dtype, micro-batch (windows × tokens per process).
    """
    params = list(model.parameters())
    total, trainable = _numel(params), _numel(p for p in params if p.requires_grad)
    cfg = model.cfg
    blocks = list(model.trf_blocks)
    block = _numel(blocks[0].parameters()) if blocks else 0
    block_trainable = max((_numel(p for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
    root = total - _numel(p for b in blocks for p in b.parameters())
    root_trainable = trainable - _numel(p for b in blocks for p in b.parameters() if p.requires_grad)
    compute = 2 if plan.dtype == torch.bfloat16 else 4
    state = (4 * total, 4 * trainable, 8 * trainable)  # fp32 weights, gradients, AdamW's two moments
    fsdp = plan.strategy == "fsdp" and plan.world > 1
    if fsdp:
        state = tuple(n / plan.world for n in state)
        # the root stays gathered through forward and backward, and one block is gathered while the next is
        # prefetched; the gathered blocks' gradients exist until they are reduce-scattered
        working = compute * (root + 2 * block) + compute * (root_trainable + block_trainable)
    else:
        working = 4 * trainable if plan.world > 1 else 0  # DDP copies gradients into its buckets
        if plan.dtype != torch.float32:
            working += compute * total  # autocast keeps a bfloat16 copy of every weight through the step
    b, s, h = plan.batch, plan.tokens, cfg.emb_dim
    vocab = getattr(getattr(model, "out_head", None), "out_features", cfg.vocab_size)
    per_block = (BLOCK_BYTES.get(plan.dtype, 104) + (DROPOUT_BYTES if cfg.drop_rate > 0 else 0)) * h
    if plan.activation_checkpointing:  # each block keeps its input; one block's activations are rebuilt at a time
        blocks_bytes = len(blocks) * h * 4 + per_block
    else:
        blocks_bytes = len(blocks) * per_block
    logits = vocab * (compute + 8)  # the logits, (under autocast) their float32 copy, and log-softmax's output
    activations = b * s * (blocks_bytes + 2 * h * 4 + logits)
    weights, grads, optim = state
    host = 0.0
    if fsdp and plan.cpu_offload:
        host, weights, grads, optim = weights + grads + optim, 0.0, 0.0, 0.0
    return Estimate(weights, grads, optim, working, activations, host)


def device_capacity(device: torch.device, processes_here: int) -> float | None:
    """Bytes one process may use: a GPU's memory, or the machine's RAM shared by its processes; None where
    unknown (MPS shares memory with the system)."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(processes_here, 1)
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _alternatives(plan: Plan):
    """Plans that need less memory, from the least to the most intrusive change."""
    steps = []
    if plan.world > 1 and plan.strategy != "fsdp":
        steps.append(lambda p: replace(p, strategy="fsdp"))
    if not plan.activation_checkpointing:
        steps.append(lambda p: replace(p, activation_checkpointing=True))
    if plan.dtype == torch.float32:
        steps.append(lambda p: replace(p, dtype=torch.bfloat16))
    if plan.world > 1 and not plan.cpu_offload:
        steps.append(lambda p: replace(p, strategy="fsdp", cpu_offload=True))
    p = plan
    for step in steps:
        p = step(p)
        yield p
    while p.batch > 1:
        p = replace(p, batch=p.batch // 2)
        yield p


def check_fits(model: nn.Module, plan: Plan, capacity: float | None, what: str) -> Estimate:
    """The estimate for `plan`; one clear line when it exceeds `capacity`, naming the flags that would fit."""
    est = estimate(model, plan)
    if capacity is None or est.total <= capacity:
        return est
    fix = next((p for p in _alternatives(plan) if estimate(model, p).total <= capacity), None)
    hint = f"try {fix.flags()}" if fix is not None else "use more processes with --strategy fsdp, or a bigger device"
    raise Gpt2LoadError(
        f"training needs about {_gb(est.total)} per process ({plan.flags()}) but {what} has {_gb(capacity)}: "
        f"{hint} (--no-memory-check to try anyway)"
    )


def batch_shape(loader: Iterable) -> tuple[int, int]:
    """(windows, tokens) of one batch of this process, read without disturbing the run's RNG."""
    with torch.random.fork_rng(devices=[]):
        x, _ = next(iter(eval_batches(loader, 1)))
    return (x.shape[0], x.shape[1]) if x.dim() == 2 else (1, x.numel())


def plan_and_check(
    model: nn.Module,
    loader: Iterable,
    strategy: str,
    world: int,
    dtype: torch.dtype,
    device: torch.device,
    cfg,
    log: Callable[[str], None],
) -> Estimate:
    """At the start of a run: the estimate for this run, logged as one line, and the refusal when it cannot
    fit (unless cfg.memory_check is False). Every rank computes the same, so every rank refuses alike."""
    batch, tokens = batch_shape(loader)
    plan = Plan(strategy, world, dtype, batch, tokens, cfg.activation_checkpointing, cfg.cpu_offload)
    here = sum(h == socket.gethostname() for h in gather(socket.gethostname())) if device.type == "cpu" else 1
    capacity = device_capacity(device, here)
    what = f"{device} ({here} processes on this machine)" if here > 1 else str(device)
    est = check_fits(model, plan, capacity if cfg.memory_check else None, what)
    log(f"gpt2load: {est.line(plan, capacity)}")
    return est


__all__ = ["Estimate", "Plan", "batch_shape", "check_fits", "device_capacity", "estimate", "plan_and_check"]
