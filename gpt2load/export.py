"""Write a GPTModel out: gpt2load's own safetensors form, a transformers folder, the book's .pth, or GGUF.

Every format is written tensor by tensor: a tensor is moved to the CPU, cast and re-laid-out only as it is
written, so exporting costs the loaded model plus about one tensor of memory (the .pth format excepted when
the dtype changes, since torch.save wants every tensor at once).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from . import stfile
from .build import dtype_name, pick_dtype
from .config import hf_config_dict
from .errors import Gpt2LoadError
from .gguf import GGUF_DTYPES, export_gguf, gguf_dtype
from .load import OWN_FORMAT, write_own
from .model import GPTModel, stored_state
from .stfile import current_umask
from .tensors import layout_specs, to_layout
from .tokenizer import find_tokenizer_files

FORMATS = ("safetensors", "hf", "pth", "gguf")
_SHORT_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # GGUF's names, accepted everywhere
QUANTIZED = tuple(d for d in GGUF_DTYPES if d not in _SHORT_NAMES)


def float_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """float32, bfloat16 or float16 from a name (GGUF's f32, bf16, f16 included) or a torch dtype."""
    if isinstance(dtype, str) and dtype.lower() in QUANTIZED:
        raise Gpt2LoadError(f"dtype {dtype} is a GGUF quantization: use --to gguf, or float32, bfloat16, float16")
    return pick_dtype(_SHORT_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype)


def export_dtype(model: GPTModel, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to write: the one asked for, else the model's own."""
    return model.tok_emb.weight.dtype if dtype is None else float_dtype(dtype)


def load_dtype(to: str, dtype: str | None) -> torch.dtype | None:
    """The dtype to load a model in before exporting it as `to` in `dtype`: the target itself when it is a
    float type (so nothing detours through float32), else None, the stored dtype (GGUF keeps 1-D tensors in
    f32 and quantizes from the stored values)."""
    return None if to == "gguf" or dtype is None else float_dtype(dtype)


def _stored_tensors(model: GPTModel, dtype: torch.dtype):
    """The model's stored tensors in GPTModel names, each moved to the CPU and cast only when it is written."""
    for k, v in stored_state(model).items():
        yield k, v.detach().to("cpu", dtype)


@contextmanager
def _atomic_dir(final: Path):
    """A temporary folder beside `final` that replaces it only when the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            if not final.is_dir():
                raise Gpt2LoadError(f"{final} exists and is not a folder: choose another --out")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path, names: tuple[str, str]) -> None:
    found = find_tokenizer_files(tokenizer_dir) if tokenizer_dir else None
    if found:
        for src, name in zip(found, names, strict=True):
            shutil.copyfile(src, out / name)


def save_model(
    model: GPTModel, path: str | Path, tokenizer_dir: str | Path | None = None, dtype: str | torch.dtype | None = None
) -> Path:
    """Save in gpt2load's own form: a `.safetensors` file, or a folder with model.safetensors + config.json
    (+ the tokenizer files when `tokenizer_dir` has them), loadable with `load_gpt2(path)`.

    `dtype` (float32, bfloat16, float16; default the model's) is recorded in the file and config.json, and
    `load_gpt2` keeps it unless told otherwise."""
    path, dt = Path(path), export_dtype(model, dtype)
    if path.suffix == ".safetensors":
        write_own(path, model.cfg, _stored_tensors(model, dt), dtype=dt)
        return path
    with _atomic_dir(path) as tmp:
        write_own(tmp / "model.safetensors", model.cfg, _stored_tensors(model, dt), dtype=dt)
        own = {"model_type": OWN_FORMAT, "config": model.cfg.to_dict(), "torch_dtype": dtype_name(dt)}
        (tmp / "config.json").write_text(json.dumps(own, indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("encoder.json", "vocab.bpe"))
    return path


def export_hf(
    model: GPTModel, out: str | Path, tokenizer_dir: str | Path | None = None, dtype: str | torch.dtype | None = None
) -> Path:
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads (tied head, Conv1D layout), in `dtype`
    (default the model's), recorded as config.json's torch_dtype."""
    out, dt = Path(out), export_dtype(model, dtype)
    specs = {name: (shape, dt) for name, shape, _ in layout_specs(model.cfg, "hf")}
    tensors = to_layout(_stored_tensors(model, dt), model.cfg, "hf")  # transposed one tensor at a time
    with _atomic_dir(out) as tmp:
        stfile.write_streaming(tmp / "model.safetensors", specs, tensors, {"format": "pt"})
        config = {**hf_config_dict(model.cfg), "torch_dtype": dtype_name(dt)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("vocab.json", "merges.txt"))
    return out


def _pth_state(model: GPTModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The book's state_dict on the CPU in `dtype`. Tensors already there are not copied, and tensors that
    share storage (the tied head, the one mask every layer uses) stay shared, so torch.save writes them once."""
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.device)
        if key not in cast:
            cast[key] = v.detach().to("cpu", dtype)
        state[k] = cast[key]
    return state


def export_pth(model: GPTModel, out: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """The book's state_dict (mask buffers and out_head.weight included), for load_state_dict(strict=True),
    in `dtype` (default the model's)."""
    out = Path(out)
    state = _pth_state(model, export_dtype(model, dtype))
    with stfile.atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def export(
    model: GPTModel,
    to: str,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write `model` as `to` (safetensors, hf, pth or gguf) at `out`.

    Args:
        dtype: float32, bfloat16 or float16 for safetensors/hf/pth (default the model's own); for gguf
            f32, f16 (default), bf16 or q8_0.
    """
    if to == "gguf":
        return export_gguf(model, out, tokenizer_dir, gguf_dtype(dtype))
    if to == "safetensors":
        return save_model(model, out, tokenizer_dir, dtype)
    if to == "hf":
        return export_hf(model, out, tokenizer_dir, dtype)
    if to == "pth":
        return export_pth(model, out, dtype)
    raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
