"""One optimizer step's forward and backward (token-weighted over processes and accumulation), and the run's
own RNG seeding."""

from __future__ import annotations

import random
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import Gpt2LoadError
from .data import BatchStream
from .distributed import all_sum
from .evaluation import autocast


@contextmanager
def run_rng(seed: int, device: torch.device):
    """Seed the global RNGs for the run (dropout and a shuffling DataLoader draw from them; neither takes a
    private generator), and give the caller back exactly the states it had: train() reseeds nothing for them."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def train_step(net: nn.Module, batches: BatchStream, cfg, amp: torch.dtype, device, world: int):
    """Forward and backward over grad_accum batches, weighting every target of every process equally.

    Returns (mean loss on this process, input tokens on all processes)."""
    micro = [next(batches) for _ in range(cfg.grad_accum)]
    local = sum(cfg.count_fn(y) for _, y in micro)
    (total,) = all_sum([float(local)], device)
    if total == 0:
        raise Gpt2LoadError("a training step has no targets to learn from (all -100): check the data's targets")
    loss_sum, tokens = 0.0, 0
    for k, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = k == len(micro) - 1 or not isinstance(net, DistributedDataParallel)
        with nullcontext() if sync else net.no_sync():
            with autocast(device, amp):
                loss, _ = cfg.loss_fn(net, x, y)
            # DDP (and FSDP, as sharding.py sets it) averages gradients over processes, so scaling each sum by
            # world / (targets on every process) makes the step follow the mean over every target of the global
            # batch, however they are spread
            (loss * (world / total)).backward()
        loss_sum += loss.item()
        tokens += x.numel() * world
    return loss_sum / max(local, 1), tokens


__all__ = ["run_rng", "train_step"]
