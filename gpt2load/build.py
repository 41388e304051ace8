"""Build a GPTModel from converted tensors without random initialisation (meta device + assign)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import GPTConfig
from .model import GPTModel


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else cuda, then mps, then cpu."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            from .errors import Gpt2LoadError

            raise Gpt2LoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
        _check_available(dev)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(dev: torch.device) -> None:
    from .errors import Gpt2LoadError

    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Gpt2LoadError(f"device {dev} was asked for but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Gpt2LoadError(f"device {dev} was asked for but MPS is not available here: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise Gpt2LoadError(f"device {dev} is not supported: use cpu, cuda or mps")


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name configs record and pick_dtype reads back."""
    return str(dtype).removeprefix("torch.")


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    from .errors import Gpt2LoadError

    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise Gpt2LoadError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise Gpt2LoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[dtype]


@contextmanager
def _skip_init() -> Iterator[None]:
    """Skip nn.Linear/nn.Embedding random init: the weights are about to be replaced, and even on the meta
    device torch's init routes through slow reference kernels (about a second and 100 MB of imports)."""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved.items():
            cls.reset_parameters = fn


def empty_model(cfg: GPTConfig) -> GPTModel:
    """A GPTModel whose parameters take no memory (meta device), to be filled with `assign`."""
    with _skip_init(), torch.device("meta"):
        return GPTModel(cfg)


def model_from_tensors(
    cfg: GPTConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> GPTModel:
    """A GPTModel in eval mode holding `tensors` (GPTModel names, tied head and masks not needed).

    Each tensor is moved and cast one at a time, so peak memory stays near one copy of the weights. Without
    `dtype`, the model takes the floating dtype of the first tensor (float32 if that is not a float type).
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype) if dtype is not None else None
    model = empty_model(cfg)
    state = {}
    for name, t in tensors:
        if dt is None:
            dt = t.dtype if t.dtype in DTYPES.values() else torch.float32
        state[name] = t.to(device=dev, dtype=dt)
    state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.reset_masks()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:  # convert_tensors checks coverage already; this guards other callers
        from .errors import Gpt2LoadError

        raise Gpt2LoadError(f"weights for {missing[:3]} are missing")
    return model.eval()
