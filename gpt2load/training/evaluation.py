"""Losses and evaluation: every loss is a sum over targets divided by their count, with targets of -100
ignored (padding, masked prompts), token-weighted across batches and processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Gpt2LoadError
from ..generation.generate import generate
from ..model.build import pick_dtype
from ..model.gpt import GPTModel
from ..tokenizer import EOT_ID, decode_ids, encode
from .distributed import all_sum

IGNORE_INDEX = -100  # targets with this value count for nothing (padding, masked prompts), as in PyTorch

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, "torch.Tensor | int"]]


def token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, number of targets) of next-token predictions, ignoring targets of -100.

    The default `loss_fn`: a hook returns a sum and a count, so every mean is over targets, never batches."""
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


def count_targets(y: torch.Tensor) -> int:
    """The targets of a batch that count (not -100): the denominator of a step's mean loss."""
    return int((y != IGNORE_INDEX).sum())


def autocast(device: torch.device, dtype: torch.dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def loss_sums(model: nn.Module, batches: Iterable[Batch], amp_dtype: torch.dtype, loss_fn: LossFn) -> list[float]:
    """[summed loss, targets] over `batches`, added up over every process's share."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for x, y in batches:
            with autocast(device, amp_dtype):
                loss, n = loss_fn(model, x.to(device), y.to(device))
            total, count = total + float(loss), count + float(n)
    finally:
        model.train(was_training)
    return all_sum([total, count], device)


def eval_batches(loader, n: int | None) -> Iterable[Batch]:
    if n is None:
        return loader
    if hasattr(loader, "fixed_batches"):
        return loader.fixed_batches(n)
    return islice(iter(loader), n)


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    max_batches: int | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    loss_fn: LossFn = token_loss,
) -> float:
    """The mean loss per target over `loader`, token-weighted across batches (targets of -100 ignored).

    Args:
        model: called as `model(x)` (any module; gpt2load's GPTModel by default loss_fn).
        loader: yields (input, target) batches.
        max_batches: at most this many batches (a WindowLoader gives evenly spread fixed ones).
        dtype: "float32", or "bfloat16" for autocast.
        loss_fn: (model, x, y) -> (summed loss, number of targets).
    """
    total, count = loss_sums(model, eval_batches(loader, max_batches), pick_dtype(dtype), loss_fn)
    if count == 0:
        raise Gpt2LoadError("evaluate: the loader gave no targets (every target is -100, or no batches)")
    return total / count


@torch.no_grad()
def sample_text(model: GPTModel, enc, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` (stops at <|endoftext|>), for a glance at what the model learned."""
    ids = encode(enc, prompt) or [EOT_ID]
    idx = torch.tensor([ids[-model.cfg.context_length :]], device=model.pos_emb.weight.device)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, model.cfg.context_length, temperature=0.0, eos_id=EOT_ID)
    model.train(was_training)
    return decode_ids(enc, out[0, idx.shape[1] :].tolist())


__all__ = [
    "IGNORE_INDEX",
    "LossFn",
    "autocast",
    "count_targets",
    "eval_batches",
    "evaluate",
    "loss_sums",
    "sample_text",
    "token_loss",
]
