"""Build a GPTModel from converted tensors without random initialisation (meta device + assign)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import Gpt2LoadError
from .config import GPTConfig
from .gpt import GPTModel


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device to use: the one asked for, else cuda, then mps, then cpu."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise Gpt2LoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
        _check_available(dev)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_available(dev: torch.device) -> None:
    if dev.type == "meta":  # torch accepts it, but a model there has shapes and no values
        raise Gpt2LoadError(
            "device meta holds only shapes, no weights, so a loaded model cannot run on it: use cpu, cuda or mps "
            "(gpt2load.model.build.empty_model gives a meta-device model to fill yourself)"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise Gpt2LoadError(f"device {dev} was asked for but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Gpt2LoadError(f"device {dev} was asked for but MPS is not available here: use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
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
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise Gpt2LoadError(f"dtype {dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype not in DTYPES:
        raise Gpt2LoadError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[dtype]


# The torch.nn.init functions modules call from reset_parameters (each dispatches through torch functions).
_INIT_FUNCTIONS = frozenset(
    getattr(nn.init, n)
    for n in ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "orthogonal_")
    + ("kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
)


class _SkipInit(TorchFunctionMode):
    """Turn torch.nn.init calls into no-ops while active: the weights are about to be replaced, and even on the
    meta device torch's init routes through slow reference kernels (about 2 s and 100 MB of imports at 1558M).
    A function mode lives on the calling thread's stack only, so other threads building models are untouched
    (unlike patching nn.Linear.reset_parameters, which changes every thread in the process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _INIT_FUNCTIONS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def empty_model(cfg: GPTConfig) -> GPTModel:
    """A GPTModel whose parameters take no memory (meta device), to be filled with `assign`."""
    with _SkipInit(), torch.device("meta"):
        return GPTModel(cfg)


def model_from_tensors(
    cfg: GPTConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    tied: bool | None = None,
) -> GPTModel:
    """A GPTModel in eval mode holding `tensors` (GPTModel names), without random initialisation.

    The head follows the tensors: no `out_head.weight` (or one equal to `tok_emb.weight`) gives a head tied
    to the embedding; a different one, an untied head; another shape or an `out_head.bias`, a classifier head
    of that shape. `tied=False` keeps a head untied even when its values equal the embedding's (a file that
    recorded it so). Each tensor is moved and cast one at a time, so peak memory stays near one copy. Without
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
    state.setdefault("out_head.weight", state["tok_emb.weight"])
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    if unexpected:  # e.g. q/k/v biases for a config without them: never dropped in silence
        raise Gpt2LoadError(f"tensors {unexpected[:3]} have no place in a GPTModel of this config")
    if tied is False:
        model.untie_head()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:  # convert_tensors checks coverage already; this guards other callers
        raise Gpt2LoadError(f"weights for {missing[:3]} are missing")
    return model.eval()
