"""What trains, and how fast: layer freezing, AdamW parameter groups, and the warmup + cosine schedule."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..model.gpt import GPTModel


def parse_train_layers(spec: str, n_layers: int) -> int | None:
    """None for 'all', N for 'last:N' (checked against the model's block count)."""
    if spec == "all":
        return None
    m = re.fullmatch(r"last:(\d+)", spec)
    if not m:
        raise Gpt2LoadError(f"--train-layers {spec!r} is not understood: use all or last:N")
    n = int(m.group(1))
    if not 1 <= n <= n_layers:
        raise Gpt2LoadError(f"--train-layers {spec}: the model has {n_layers} blocks, so use last:1 to last:{n_layers}")
    return n


def head_is_tied(model: GPTModel) -> bool:
    """Tied means the very same Parameter, not equal names or values."""
    return model.out_head.weight is model.tok_emb.weight


def apply_freezing(model: GPTModel, spec: str | None = "all") -> list[nn.Parameter]:
    """Set requires_grad for `spec` and return the trainable parameters (each once).

    'all' trains everything. 'last:N' trains the last N transformer blocks and the final LayerNorm, as the
    book's chapter 6 does, and freezes the embeddings. A head tied to the token embedding stays frozen with
    it (training it would move every input embedding too); a head of its own (chapter 6's classifier, an
    untied copy) always trains. None keeps what the caller chose (e.g. LoRA adapters and a new head).
    """
    if spec is None:
        return list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    n = parse_train_layers(spec, model.cfg.n_layers)
    for p in model.parameters():
        p.requires_grad_(n is None)
    if n is not None:
        trained = [*model.trf_blocks[-n:], model.final_norm]
        if not head_is_tied(model):
            trained.append(model.out_head)
        for module in trained:
            for p in module.parameters():
                p.requires_grad_(True)
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def make_optimizer(model: GPTModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices of the blocks and the head only: not on biases, LayerNorms or
    embeddings (a tied head is the token embedding's Parameter, so it lands once, in the no-decay group)."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = model.tok_emb.weight.device
    fused = device.type in ("cpu", "cuda")  # one kernel per step instead of a Python loop (CPU: torch >= 2.4)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


class WarmupCosine:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `total` steps.

    Its state is only the step count, so a resumed run may change the schedule's settings (with a warning).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int) -> None:
        self.optimizer, self.lr, self.min_lr, self.warmup, self.total = optimizer, lr, min_lr, warmup, total
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    @property
    def current(self) -> float:
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.current

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


__all__ = ["WarmupCosine", "apply_freezing", "head_is_tied", "make_optimizer", "parse_train_layers"]
