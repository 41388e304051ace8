"""Write a GPTModel out: gpt2load's own safetensors form, a transformers folder, or the book's .pth."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from . import stfile
from .config import hf_config_dict
from .convert import HF, HF_PREFIX, to_source_layout
from .errors import Gpt2LoadError
from .load import OWN_FORMAT, write_own
from .lora import ADAPTERS_KEY, ADAPTERS_NAME, lora_settings, lora_state, merge_lora, without_adapters, write_adapters
from .model import GPTModel, stored_state
from .stfile import current_umask
from .tokenizer import find_tokenizer_files

FORMATS = ("safetensors", "hf", "pth")


def _params(model: GPTModel) -> dict[str, torch.Tensor]:
    """Parameters in GPTModel names, without the tied head and mask buffers, as float32 on the CPU."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in stored_state(model).items()}


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
    model: GPTModel,
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    metadata: dict[str, str] | None = None,
    write_extra: Callable[[Path], object] | None = None,
) -> Path:
    """Save in gpt2load's own form: a `.safetensors` file, or a folder with model.safetensors + config.json
    (+ the tokenizer files when `tokenizer_dir` has them), loadable with `load_gpt2(path)`. `metadata` joins
    the file's header metadata (e.g. a classifier's labels, an instruction model's prompt_template);
    `write_extra(folder)` adds files to a folder before it appears (e.g. LoRA adapters)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        write_own(path, model.cfg, _params(model).items(), metadata)
        return path
    with _atomic_dir(path) as tmp:
        write_own(tmp / "model.safetensors", model.cfg, _params(model).items(), metadata)
        (tmp / "config.json").write_text(
            json.dumps({"model_type": OWN_FORMAT, "config": model.cfg.to_dict()}, indent=2) + "\n"
        )
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("encoder.json", "vocab.bpe"))
        if write_extra is not None:
            write_extra(tmp)
    return path


def save_finetuned(
    model: GPTModel, folder: str | Path, tokenizer_dir: str | Path | None, metadata: dict[str, str], merge: bool = True
) -> Path:
    """Save a trained model folder: LoRA adapters merged in (the model is changed in place), or with
    merge=False the base weights plus adapters.safetensors (one folder, written at once), named in the metadata
    so that loading puts them back on and a copy without them fails loudly."""
    folder = Path(folder)
    if merge or lora_settings(model) is None:
        return save_model(merge_lora(model), folder, tokenizer_dir, metadata)
    settings, tensors = lora_settings(model), lora_state(model)
    with without_adapters(model):
        return save_model(
            model,
            folder,
            tokenizer_dir,
            {**metadata, ADAPTERS_KEY: ADAPTERS_NAME},
            lambda tmp: write_adapters(tmp / ADAPTERS_NAME, settings, tensors),
        )


def export_hf(model: GPTModel, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads (tied head, Conv1D layout)."""
    out = Path(out)
    state = to_source_layout(_params(model), HF, model.cfg)
    specs = {HF_PREFIX + k: (tuple(v.shape), torch.float32) for k, v in state.items()}
    with _atomic_dir(out) as tmp:
        stfile.write_streaming(
            tmp / "model.safetensors", specs, ((HF_PREFIX + k, v) for k, v in state.items()), {"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("vocab.json", "merges.txt"))
    return out


def export_pth(model: GPTModel, out: str | Path) -> Path:
    """The book's state_dict (mask buffers and out_head.weight included), for load_state_dict(strict=True)."""
    out = Path(out)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    with stfile.atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def export(model: GPTModel, to: str, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as `to` (safetensors, hf or pth) at `out`."""
    if to == "safetensors":
        return save_model(model, out, tokenizer_dir)
    if to == "hf":
        return export_hf(model, out, tokenizer_dir)
    if to == "pth":
        return export_pth(model, out)
    raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
