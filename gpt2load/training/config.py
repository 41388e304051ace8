"""`TrainConfig`, everything `train` does besides the model and the data, and the check of its values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import Gpt2LoadError
from .distributed import dist_info
from .evaluation import LossFn, count_targets, token_loss
from .sharding import check_strategy


def check_positive(**values) -> None:
    """Each value must be None or a positive int; the error names it as the CLI flag (--batch-size)."""
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise Gpt2LoadError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


@dataclass
class TrainConfig:
    """Everything `train` does besides the model and the data. See `train` for each field."""

    max_steps: int | None = None
    epochs: int | None = None
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    dtype: str | torch.dtype = "float32"
    train_layers: str | None = "all"
    eval_every: int = 100
    eval_batches: int = 10
    save_every: int | None = 500
    keep_checkpoints: int = 3
    out_dir: str | Path | None = None
    resume: bool = False
    seed: int = 123
    tokenizer: object = None
    sample_prompt: str | None = None
    sample_tokens: int = 40
    progress: bool | None = None
    log: Callable[[str], None] | None = None
    run_info: dict | None = None
    loss_fn: LossFn = token_loss
    count_fn: Callable[[torch.Tensor], int] = count_targets
    metrics_fn: Callable[[nn.Module], dict] | None = None
    strategy: str = "ddp"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    memory_check: bool = True

    def check(self) -> None:
        """One clear error for a value out of range (named as the CLI flag)."""
        names = ("max_steps", "epochs", "grad_accum", "eval_batches", "keep_checkpoints")
        check_positive(**{name: getattr(self, name) for name in names})
        for name in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int | float) or v < 0 or not math.isfinite(v)):
                raise Gpt2LoadError(f"--{name.replace('_', '-')} must be a number of at least 0, got {v!r}")
        if not isinstance(self.sample_tokens, int) or self.sample_tokens < 0:
            raise Gpt2LoadError(f"--sample-tokens must be a number of at least 0, got {self.sample_tokens!r}")
        if self.resume and self.out_dir is None:
            raise Gpt2LoadError("resume needs out_dir, where the checkpoints are")
        check_strategy(self.strategy, self.cpu_offload, dist_info()[1])


__all__ = ["TrainConfig", "check_positive"]
