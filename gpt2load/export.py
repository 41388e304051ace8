"""Write a GPTModel out: gpt2load's own safetensors form, a transformers folder, or the book's .pth."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from . import stfile
from .config import hf_config_dict
from .convert import HF, HF_PREFIX, to_source_layout
from .errors import Gpt2LoadError
from .fsutil import atomic_dir, atomic_output_file, check_output, mark_file
from .load import OWN_FORMAT, write_own
from .model import GPTModel, stored_state
from .tokenizer import find_tokenizer_files

FORMATS = ("safetensors", "hf", "pth")


def is_folder_output(to: str, out: str | Path) -> bool:
    """Whether format `to` writes a folder at `out` (hf, safetensors without the suffix) or a file."""
    return to == "hf" or (to == "safetensors" and Path(out).suffix != ".safetensors")


def _params(model: GPTModel) -> dict[str, torch.Tensor]:
    """Parameters in GPTModel names, without the tied head and mask buffers, as float32 on the CPU."""
    return {k: v.detach().to("cpu", torch.float32) for k, v in stored_state(model).items()}


def _copy_tokenizer(tokenizer_dir: Path | None, out: Path, names: tuple[str, str]) -> None:
    found = find_tokenizer_files(tokenizer_dir) if tokenizer_dir else None
    if found:
        for src, name in zip(found, names, strict=True):
            shutil.copyfile(src, out / name)


def save_model(
    model: GPTModel,
    path: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """Save in gpt2load's own form: a `.safetensors` file, or a folder with model.safetensors + config.json
    (+ the tokenizer files when `tokenizer_dir` has them), loadable with `load_gpt2(path)`.

    `path` must be new (or an empty folder); `force` replaces an earlier gpt2load safetensors output there,
    and nothing else. `protect`: paths (the source) that `path` may not be or contain."""
    path = Path(path)
    if path.suffix == ".safetensors":
        check_output(path, "safetensors", folder=False, force=force, protect=protect)
        write_own(path, model.cfg, _params(model).items())
        mark_file(path, "safetensors")
        return path
    with atomic_dir(path, "safetensors", force=force, protect=protect) as tmp:
        write_own(tmp / "model.safetensors", model.cfg, _params(model).items())
        (tmp / "config.json").write_text(
            json.dumps({"model_type": OWN_FORMAT, "config": model.cfg.to_dict()}, indent=2) + "\n"
        )
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("encoder.json", "vocab.bpe"))
    return path


def export_hf(
    model: GPTModel,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads (tied head, Conv1D layout).
    `out`, `force`, `protect`: as for `save_model`."""
    out = Path(out)
    state = to_source_layout(_params(model), HF, model.cfg)
    specs = {HF_PREFIX + k: (tuple(v.shape), torch.float32) for k, v in state.items()}
    with atomic_dir(out, "hf", force=force, protect=protect) as tmp:
        stfile.write_streaming(
            tmp / "model.safetensors", specs, ((HF_PREFIX + k, v) for k, v in state.items()), {"format": "pt"}
        )
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("vocab.json", "merges.txt"))
    return out


def export_pth(model: GPTModel, out: str | Path, *, force: bool = False, protect: Sequence[Path] = ()) -> Path:
    """The book's state_dict (mask buffers and out_head.weight included), for load_state_dict(strict=True).
    `out`, `force`, `protect`: as for `save_model`."""
    out = Path(out)
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    with atomic_output_file(out, "pth", force=force, protect=protect) as tmp:
        torch.save(state, tmp)
    return out


def export(
    model: GPTModel,
    to: str,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
) -> Path:
    """Write `model` as `to` (safetensors, hf or pth) at `out`.

    Args:
        out: a new path, or an empty folder; never a folder or file gpt2load did not write.
        force: replace an earlier gpt2load output of the same format at `out` (only its own files).
        protect: paths (e.g. the source model) that `out` may not be or contain.
    """
    if to == "safetensors":
        return save_model(model, out, tokenizer_dir, force=force, protect=protect)
    if to == "hf":
        return export_hf(model, out, tokenizer_dir, force=force, protect=protect)
    if to == "pth":
        return export_pth(model, out, force=force, protect=protect)
    raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
