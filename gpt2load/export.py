"""Write a GPTModel out: gpt2load's own safetensors form, a transformers folder, or the book's .pth."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from . import stfile
from .config import hf_config_dict
from .convert import HF, HF_PREFIX, to_source_layout
from .errors import Gpt2LoadError
from .fsutil import atomic_dir, atomic_output_file, check_output, mark_file
from .load import OWN_FORMAT, write_own
from .model import GPTModel, causal_mask, stored_state
from .quant import dequantize_model, quantization, refuse_quantized
from .tokenizer import find_tokenizer_files

FORMATS = ("safetensors", "hf", "pth")
QKV = ("query", "key", "value")


def is_folder_output(to: str, out: str | Path) -> bool:
    """Whether format `to` writes a folder at `out` (hf, safetensors without the suffix) or a file."""
    return to == "hf" or (to == "safetensors" and Path(out).suffix != ".safetensors")


def _params(model: GPTModel) -> dict[str, torch.Tensor]:
    """Parameters in GPTModel names, without the tied head and mask buffers, as float32 on the CPU (int8
    weights as they are)."""
    return {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
        for k, v in stored_state(model).items()
    }


def _int8_head(model: GPTModel) -> dict:
    """The head record of a quantized model: always its own (int8) tensor."""
    head = model.out_head
    return {"tied": False, "shape": [head.out_features, head.in_features], "bias": head.bias is not None}


def float_model(model: GPTModel, to: str, dequantize: bool = False) -> GPTModel:
    """`model` itself when its weights are float; for an int8 model, a dequantized copy if `dequantize`, else
    a Gpt2LoadError (format `to` holds float weights only)."""
    if not dequantize:
        refuse_quantized(
            model,
            f"the {to} format cannot hold",
            "export with dequantize=True (--dequantize) to write float32 weights, or save with --to safetensors",
        )
        return model
    return dequantize_model(copy.deepcopy(model)) if quantization(model) else model


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
    (+ the tokenizer files when `tokenizer_dir` has them), loadable with `load_gpt2(path)`. The head is kept
    as the model has it (tied, untied, or a classifier of any shape, with or without bias) and recorded.

    `path` must be new (or an empty folder); `force` replaces an earlier gpt2load safetensors output there,
    and nothing else. `protect`: paths (the source) that `path` may not be or contain."""
    path = Path(path)
    quantized = quantization(model)
    cfg, head = model.real_config(), _int8_head(model) if quantized else model.head_meta()
    if path.suffix == ".safetensors":
        check_output(path, "safetensors", folder=False, force=force, protect=protect)
        write_own(path, cfg, _params(model).items(), head=head, quantized=quantized)
        mark_file(path, "safetensors")
        return path
    with atomic_dir(path, "safetensors", force=force, protect=protect) as tmp:
        write_own(tmp / "model.safetensors", cfg, _params(model).items(), head=head, quantized=quantized)
        (tmp / "config.json").write_text(
            json.dumps({"model_type": OWN_FORMAT, "config": cfg.to_dict()}, indent=2) + "\n"
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
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads (Conv1D layout; an untied head as
    `lm_head.weight` with tie_word_embeddings false). A head GPT2LMHeadModel cannot hold (another shape, a
    bias) is refused: use gpt2load's own form or pth. `out`, `force`, `protect`: as for `save_model`."""
    out = Path(out)
    refuse_quantized(model, "transformers' GPT2LMHeadModel cannot hold", "export with dequantize=True (--dequantize)")
    head, cfg = model.head_meta(), model.real_config()
    if head["bias"] or head["shape"] != [cfg.vocab_size, cfg.emb_dim]:
        raise Gpt2LoadError(
            f"the model's head is {head['shape']}{' with a bias' if head['bias'] else ''}, which transformers' "
            f"GPT2LMHeadModel cannot hold (it needs [{cfg.vocab_size}, {cfg.emb_dim}] without bias): export with "
            "--to safetensors or --to pth instead"
        )
    params = _params(model)
    lm_head = params.pop("out_head.weight", None)
    if not cfg.qkv_bias:  # GPT-2's c_attn always has a bias: zeros compute the same
        zero = torch.zeros(cfg.emb_dim)
        params.update({f"trf_blocks.{i}.att.W_{n}.bias": zero for i in range(cfg.n_layers) for n in QKV})
        cfg = replace(cfg, qkv_bias=True)
    names = {HF_PREFIX + k: v for k, v in to_source_layout(params, HF, cfg).items()}
    if lm_head is not None:
        names["lm_head.weight"] = lm_head
    specs = {k: (tuple(v.shape), torch.float32) for k, v in names.items()}
    config = {**hf_config_dict(cfg), "tie_word_embeddings": lm_head is None}
    with atomic_dir(out, "hf", force=force, protect=protect) as tmp:
        stfile.write_streaming(tmp / "model.safetensors", specs, iter(names.items()), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("vocab.json", "merges.txt"))
    return out


def export_pth(model: GPTModel, out: str | Path, *, force: bool = False, protect: Sequence[Path] = ()) -> Path:
    """The book's state_dict, for its GPTModel's load_state_dict(strict=True): out_head as the model has it
    (the tied head written as a copy of tok_emb, as the book keeps it) and the book's `mask` buffers (one
    shared tensor in the file, which gpt2load itself never builds). `out`, `force`, `protect`: as for
    `save_model`."""
    out = Path(out)
    refuse_quantized(model, "the book's GPTModel cannot hold", "export with dequantize=True (--dequantize)")
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    mask = causal_mask(model.cfg.context_length)
    for i in range(len(model.trf_blocks)):
        state[f"trf_blocks.{i}.att.mask"] = mask
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
    dequantize: bool = False,
) -> Path:
    """Write `model` as `to` (safetensors, hf or pth) at `out`.

    Args:
        out: a new path, or an empty folder; never a folder or file gpt2load did not write.
        force: replace an earlier gpt2load output of the same format at `out` (only its own files).
        protect: paths (e.g. the source model) that `out` may not be or contain.
        dequantize: write an int8 model's weights as float32 (hf and pth hold only floats; safetensors keeps
            int8 unless this is set). The model itself is not changed.
    """
    if to == "safetensors":
        return save_model(
            float_model(model, to, True) if dequantize else model, out, tokenizer_dir, force=force, protect=protect
        )
    if to == "hf":
        return export_hf(float_model(model, to, dequantize), out, tokenizer_dir, force=force, protect=protect)
    if to == "pth":
        return export_pth(float_model(model, to, dequantize), out, force=force, protect=protect)
    raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
