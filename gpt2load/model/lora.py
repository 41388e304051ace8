"""Low-rank adapters (LoRA, the book's appendix E): wrap a model's Linears, train only the adapters, merge.

A wrapped Linear computes `linear(x) + alpha * (x @ A @ B)`: A [in, rank] starts random, B [rank, out] starts
at zero, so a freshly wrapped model gives exactly the logits it gave before. The scale is `alpha` as in the
book (not the LoRA paper's alpha / rank), so the book's settings carry over unchanged. The state_dict names
(`<name>.linear.weight`, `<name>.lora.A`, `<name>.lora.B`) are the book's, so adapters move between the two.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import Gpt2LoadError
from ..fsutil import atomic_path

# Target names users pass (`--lora-targets`), each meaning module paths relative to one transformer block.
# "head" is the model's output head, allowed only when it is not tied to the token embedding.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "query": ("att.W_query",),
    "key": ("att.W_key",),
    "value": ("att.W_value",),
    "out": ("att.out_proj",),
    "attn": ("att.W_query", "att.W_key", "att.W_value", "att.out_proj"),
    "ff": ("ff.layers.0", "ff.layers.2"),
    "head": (),
}
DEFAULT_TARGETS = ("attn", "ff")
DEFAULT_ALPHA = 16.0  # the book's appendix-E setting
ADAPTERS_NAME = "adapters.safetensors"  # beside model.safetensors in a model folder saved with --no-merge
ADAPTERS_FORMAT = "gpt2load-lora"
ADAPTERS_KEY = "lora_adapters"  # model file metadata: the adapters file that belongs to it


class LoRAAdapter(nn.Module):
    """The low-rank update alone: `alpha * (x @ A @ B)`."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, device=None, dtype=None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim, device=device, dtype=dtype))
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's weight layout [out, in]."""
        return self.alpha * (self.A @ self.B).T


class LinearWithLoRA(nn.Module):
    """An nn.Linear plus a LoRA adapter; `.linear` is the original module, unchanged until merged."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        w = linear.weight
        self.lora = LoRAAdapter(linear.in_features, linear.out_features, rank, alpha, w.device, w.dtype)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    def merged(self) -> nn.Linear:
        """The plain Linear computing the same function (weight + the adapter's update)."""
        lin = self.linear
        with torch.no_grad():
            lin.weight.add_(self.lora.delta_weight().to(lin.weight.dtype))
        return lin


def check_lora_settings(rank: int, alpha: float) -> None:
    """One clear error for a rank or alpha that makes no adapter."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise Gpt2LoadError(f"--lora-rank must be a positive integer (e.g. 8 or 16), got {rank!r}")
    if not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
        raise Gpt2LoadError(f"--lora-alpha must be a positive number (e.g. 16), got {alpha!r}")


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Target names from a comma-separated string or a sequence, checked against TARGET_MODULES."""
    names = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)
    unknown = [t for t in names if t not in TARGET_MODULES]
    if unknown or not names:
        raise Gpt2LoadError(
            f"--lora-targets {','.join(names)!r} is not understood: use a comma-separated list of "
            f"{', '.join(TARGET_MODULES)} (default {','.join(DEFAULT_TARGETS)})"
        )
    return names


def _target_paths(model: nn.Module, names: Iterable[str]) -> list[str]:
    paths: list[str] = []
    for i in range(len(model.trf_blocks)):
        for name in names:
            paths += [f"trf_blocks.{i}.{p}" for p in TARGET_MODULES[name] if f"trf_blocks.{i}.{p}" not in paths]
    if "head" in names:
        if getattr(model.out_head, "weight", None) is model.tok_emb.weight:
            raise Gpt2LoadError(
                "--lora-targets head needs an output head of its own: this model's head is tied to the token "
                "embedding (a classifier's new head is not)"
            )
        paths.append("out_head")
    return paths


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _wrap(model: nn.Module, paths: Sequence[str], rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap the Linears at `paths` (all checked first), freeze the rest; the trainable parameters."""
    if any(isinstance(m, LinearWithLoRA) for m in model.modules()):
        raise Gpt2LoadError("the model already has LoRA adapters: merge them (merge_lora) before adding new ones")
    for path in paths:
        try:
            linear = model.get_submodule(path)
        except AttributeError:
            raise Gpt2LoadError(f"the model has no module {path} to put a LoRA adapter on") from None
        if not isinstance(linear, nn.Linear):
            raise Gpt2LoadError(f"{path} is a {type(linear).__name__}, not an nn.Linear: LoRA cannot wrap it")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        _set_module(model, path, LinearWithLoRA(model.get_submodule(path), rank, alpha))
    _train_adapters_and_own_head(model)
    return [p for p in model.parameters() if p.requires_grad]


def _train_adapters_and_own_head(model: nn.Module) -> None:
    """Adapters train, and a head of the model's own (a new classifier) unless it has an adapter itself."""
    for m in lora_modules(model).values():
        m.lora.requires_grad_(True)
    head = getattr(model.out_head, "weight", None)  # a wrapped head has none: its adapter trains instead
    if head is not None and head is not model.tok_emb.weight:
        model.out_head.requires_grad_(True)


def add_lora(
    model: nn.Module, rank: int, alpha: float = DEFAULT_ALPHA, targets: str | Sequence[str] = DEFAULT_TARGETS
) -> list[nn.Parameter]:
    """Wrap the target Linears of a GPTModel in LoRA adapters, in place, and freeze everything else.

    Only the adapters stay trainable, plus an output head that is not tied to the token embedding (a new
    classification head has to learn). Returns the trainable parameters.

    Args:
        model: a GPTModel (its Linears must not be wrapped already).
        rank: the adapters' inner dimension (>= 1).
        alpha: the update's scale (the book's convention: `alpha * x A B`).
        targets: names from TARGET_MODULES ("attn", "ff", "query", "key", "value", "out", "head").
    """
    check_lora_settings(rank, alpha)
    return _wrap(model, _target_paths(model, parse_targets(targets)), rank, alpha)


def setup_lora(
    model: nn.Module, rank: int | None, alpha: float, targets: str | Sequence[str], seed: int
) -> list | None:
    """What a training run's LoRA flags mean for `model`, applied in place; the adapters' settings for the run's
    record, or None when the run trains without adapters.

    A model that comes with adapters (saved unmerged) continues them when `rank` matches, and is merged first
    when `rank` is None; otherwise `rank` adds fresh adapters, their random A drawn from `seed`.
    """
    saved = lora_settings(model)
    if saved is not None and rank is None:
        merge_lora(model)
        return None
    if saved is not None:
        if saved["rank"] != rank:
            raise Gpt2LoadError(
                f"the model comes with LoRA adapters of rank {saved['rank']}: continue them with --lora-rank "
                f"{saved['rank']}, or leave --lora-rank out to train the merged model"
            )
        for p in model.parameters():  # as add_lora leaves it
            p.requires_grad_(False)
        _train_adapters_and_own_head(model)
        return [saved["rank"], saved["alpha"], ",".join(saved["targets"])]
    if rank is None:
        return None
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        torch.manual_seed(seed)
        add_lora(model, rank, alpha, targets)
    return [rank, alpha, ",".join(parse_targets(targets))]


def lora_modules(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The wrapped Linears by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}


def lora_settings(model: nn.Module) -> dict | None:
    """{"rank", "alpha", "targets" (module paths)} of the model's adapters, or None without any."""
    found = lora_modules(model)
    if not found:
        return None
    first = next(iter(found.values())).lora
    return {"rank": first.A.shape[1], "alpha": first.alpha, "targets": list(found)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear, in place: the model becomes a plain GPTModel again (the same
    logits up to float rounding) that every command and export reads. Returns the model."""
    for path, wrapped in lora_modules(model).items():
        _set_module(model, path, wrapped.merged())
    return model


@contextmanager
def without_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """The model with its original Linears in place of the wrappers for the duration (e.g. to save the base
    weights), wrapped again afterwards."""
    wrapped = lora_modules(model)
    for path, m in wrapped.items():
        _set_module(model, path, m.linear)
    try:
        yield model
    finally:
        for path, m in wrapped.items():
            _set_module(model, path, m)


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters (tensors in the book's names, settings in the metadata) as a safetensors file."""
    settings = lora_settings(model)
    if settings is None:
        raise Gpt2LoadError("the model has no LoRA adapters to save")
    return write_adapters(path, settings, lora_state(model))


def write_adapters(path: str | Path, settings: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """save_adapters from what lora_settings and lora_state gave (e.g. before the adapters were taken off)."""
    meta = {"format": ADAPTERS_FORMAT, "lora": json.dumps(settings)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), meta)
    return path


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Put the adapters of `path` (written by save_adapters) on `model`, in place; returns the model."""
    path = Path(path)
    rank, alpha, targets, tensors = read_adapters(path)
    _wrap(model, targets, rank, alpha)
    device = model.tok_emb.weight.device
    own = lora_state(model)
    if own.keys() != tensors.keys() or any(own[k].shape != t.shape for k, t in tensors.items()):
        raise Gpt2LoadError(f"{path} does not fit this model: its adapters are for other modules or sizes")
    model.load_state_dict({k: t.to(device, own[k].dtype) for k, t in tensors.items()}, strict=False)
    return model


def read_adapters(path: Path) -> tuple[int, float, list[str], dict[str, torch.Tensor]]:
    """(rank, alpha, target module paths, tensors by name) of an adapters file written by save_adapters."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        settings = json.loads(meta["lora"])
        rank, alpha, targets = int(settings["rank"]), float(settings["alpha"]), list(settings["targets"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise Gpt2LoadError(f"{path} is not a readable LoRA adapter file ({e}): save the adapters again") from None
    check_lora_settings(rank, alpha)
    return rank, alpha, targets, tensors


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, in the book's names (`<path>.lora.A`, `<path>.lora.B`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora." in k}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as if it had no adapters (`<path>.linear.weight` read as `<path>.weight`)."""
    return {k.replace(".linear.", "."): v for k, v in model.state_dict().items() if ".lora." not in k}


__all__ = [
    "DEFAULT_TARGETS",
    "LinearWithLoRA",
    "add_lora",
    "base_state",
    "lora_settings",
    "load_adapters",
    "lora_state",
    "merge_lora",
    "save_adapters",
    "write_adapters",
]
