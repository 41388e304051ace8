"""Write a GPTModel out: gpt2load's own safetensors form, a transformers folder, the book's .pth, or GGUF.

Every format is written tensor by tensor: a tensor is moved to the CPU, cast and re-laid-out only as it is
written, so exporting costs the loaded model plus about one tensor of memory (the .pth format excepted when
the dtype changes, since torch.save wants every tensor at once). Every output goes through fsutil's ownership
rules: a new path, or (with `force`) an earlier gpt2load output of the same format, never anything else.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..fsutil import atomic_dir, atomic_output_file, check_output, mark_file
from ..model.build import dtype_name, pick_dtype
from ..model.config import hf_config_dict
from ..model.gpt import GPTModel, causal_mask, stored_state
from ..model.lora import (
    ADAPTERS_KEY,
    ADAPTERS_NAME,
    lora_settings,
    lora_state,
    merge_lora,
    without_adapters,
    write_adapters,
)
from ..model.quant import dequantize_model, quantization, refuse_quantized
from ..tokenizer import find_tokenizer_files
from . import stfile
from .gguf import GGUF_DTYPES, export_gguf, gguf_dtype
from .llmc import export_llmc
from .nanogpt import export_nanogpt
from .ownform import OWN_FORMAT, write_own
from .relayout import check_finite, layout_specs, to_layout

FORMATS = ("safetensors", "hf", "pth", "gguf", "llmc", "nanogpt")
_SHORT_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # GGUF's names, accepted everywhere
QUANTIZED = tuple(d for d in GGUF_DTYPES if d not in _SHORT_NAMES)
QKV = ("query", "key", "value")
MAX_PTH_CONTEXT = 8192  # the book's mask buffer is 4 * n * n bytes: 256 MiB at 8192


def is_folder_output(to: str, out: str | Path) -> bool:
    """Whether format `to` writes a folder at `out` (hf, safetensors without the suffix) or a file."""
    return to == "hf" or (to == "safetensors" and Path(out).suffix != ".safetensors")


def float_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """float32, bfloat16 or float16 from a name (GGUF's f32, bf16, f16 included) or a torch dtype."""
    if isinstance(dtype, str) and dtype.lower() in QUANTIZED:
        raise Gpt2LoadError(f"dtype {dtype} is a GGUF quantization: use --to gguf, or float32, bfloat16, float16")
    return pick_dtype(_SHORT_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype)


def export_dtype(model: GPTModel, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to write: the one asked for, else the model's own."""
    return model.pos_emb.weight.dtype if dtype is None else float_dtype(dtype)  # tok_emb may be int8


def load_dtype(to: str, dtype: str | None) -> torch.dtype | None:
    """The dtype to load a model in before exporting it as `to` in `dtype`: the target itself when it is a
    float type (so nothing detours through float32), else None, the stored dtype (GGUF keeps 1-D tensors in
    f32 and quantizes from the stored values)."""
    return None if to == "gguf" or dtype is None else float_dtype(dtype)


def _as_written(model: GPTModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, torch.dtype]]:
    """(name, tensor, the dtype it is written in) for the model's stored tensors: `dtype` for float weights,
    int8 weights and their float32 scales as they are."""
    for k, v in stored_state(model).items():
        yield k, v, dtype if v.is_floating_point() and not k.endswith(".weight_scale") else v.dtype


def _stored_tensors(model: GPTModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's stored tensors in GPTModel names, each moved to the CPU and cast only when it is written."""
    for k, v, dt in _as_written(model, dtype):
        yield k, v.detach().to("cpu", dt)


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
    dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    metadata: dict[str, str] | None = None,
    write_extra: Callable[[Path], object] | None = None,
    strict: bool = False,
) -> Path:
    """Save in gpt2load's own form: a `.safetensors` file, or a folder with model.safetensors + config.json
    (+ the tokenizer files when `tokenizer_dir` has them), loadable with `load_gpt2(path)`. The head is kept
    as the model has it (tied, untied, or a classifier of any shape, with or without bias) and recorded.

    `dtype` (float32, bfloat16, float16; default the model's) is recorded in the file and config.json, and
    `load_gpt2` keeps it unless told otherwise. `path` must be new (or an empty folder); `force` replaces an
    earlier gpt2load safetensors output there, and nothing else. `protect`: paths (the source) that `path` may
    not be or contain. `metadata` joins the file's header metadata (a classifier's labels, an instruction model's
    prompt_template); `write_extra(folder)` adds files to a folder before it appears (e.g. LoRA adapters).
    NaN or infinite weights (as written in `dtype`) give a NonFiniteWeightsWarning, or with `strict` a
    Gpt2LoadError before anything is written."""
    path, dt = Path(path), export_dtype(model, dtype)
    quantized = quantization(model)
    cfg, head = model.real_config(), model.head_meta()
    quant = {"quantized": quantized, "float_embedding": bool(quantized) and isinstance(model.tok_emb, nn.Embedding)}
    if path.suffix == ".safetensors":
        check_output(path, "safetensors", folder=False, force=force, protect=protect)
    check_finite(_as_written(model, dt), path, strict)
    if path.suffix == ".safetensors":
        write_own(path, cfg, _stored_tensors(model, dt), metadata, head=head, dtype=dt, **quant)
        mark_file(path, "safetensors")
        return path
    with atomic_dir(path, "safetensors", force=force, protect=protect) as tmp:
        tensors = _stored_tensors(model, dt)
        write_own(tmp / "model.safetensors", cfg, tensors, metadata, head=head, dtype=dt, **quant)
        own = {"model_type": OWN_FORMAT, "config": cfg.to_dict(), "torch_dtype": dtype_name(dt)}
        (tmp / "config.json").write_text(json.dumps(own, indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("encoder.json", "vocab.bpe"))
        if write_extra is not None:
            write_extra(tmp)
    return path


def save_finetuned(
    model: GPTModel, folder: str | Path, tokenizer_dir: str | Path | None, metadata: dict[str, str], merge: bool = True
) -> Path:
    """Save a trained model folder (replacing an earlier gpt2load output there): LoRA adapters merged in (the
    model is changed in place), or with merge=False the base weights plus adapters.safetensors (one folder,
    written at once), named in the metadata so that loading puts them back on and a copy without them fails."""
    folder = Path(folder)
    if merge or lora_settings(model) is None:
        return save_model(merge_lora(model), folder, tokenizer_dir, force=True, metadata=metadata)
    settings, tensors = lora_settings(model), lora_state(model)
    with without_adapters(model):
        return save_model(
            model,
            folder,
            tokenizer_dir,
            force=True,
            metadata={**metadata, ADAPTERS_KEY: ADAPTERS_NAME},
            write_extra=lambda tmp: write_adapters(tmp / ADAPTERS_NAME, settings, tensors),
        )


def export_hf(
    model: GPTModel,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    strict: bool = False,
) -> Path:
    """A folder that transformers.GPT2LMHeadModel.from_pretrained loads (Conv1D layout; an untied head as
    `lm_head.weight` with tie_word_embeddings false), in `dtype` (default the model's), recorded as config.json's
    torch_dtype. A head GPT2LMHeadModel cannot hold (another shape, a bias) is refused: use gpt2load's own form
    or pth. `out`, `force`, `protect`, `strict`: as for `save_model`."""
    refuse_quantized(model, "transformers' GPT2LMHeadModel cannot hold", "export with dequantize=True (--dequantize)")
    out, dt = Path(out), export_dtype(model, dtype)
    head, cfg = model.head_meta(), model.real_config()
    if head["bias"] or head["shape"] != [cfg.vocab_size, cfg.emb_dim]:
        raise Gpt2LoadError(
            f"the model's head is {head['shape']}{' with a bias' if head['bias'] else ''}, which transformers' "
            f"GPT2LMHeadModel cannot hold (it needs [{cfg.vocab_size}, {cfg.emb_dim}] without bias): export with "
            "--to safetensors or --to pth instead"
        )
    check_finite(_as_written(model, dt), out, strict)
    untied = not head["tied"]
    zero_bias = not cfg.qkv_bias  # GPT-2's c_attn always has a bias: zeros compute the same
    hf_cfg = replace(cfg, qkv_bias=True)

    def book() -> Iterator[tuple[str, torch.Tensor]]:
        for k, v in _stored_tensors(model, dt):
            if k != "out_head.weight":
                yield k, v
        if zero_bias:
            zero = torch.zeros(cfg.emb_dim, dtype=dt)
            yield from ((f"trf_blocks.{i}.att.W_{n}.bias", zero) for i in range(cfg.n_layers) for n in QKV)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from to_layout(book(), hf_cfg, "hf")  # transposed one tensor at a time
        if untied:
            yield "lm_head.weight", model.out_head.weight.detach().to("cpu", dt)

    specs = {name: (shape, dt) for name, shape, _ in layout_specs(hf_cfg, "hf")}
    if untied:
        specs["lm_head.weight"] = ((cfg.vocab_size, cfg.emb_dim), dt)
    config = {**hf_config_dict(hf_cfg), "torch_dtype": dtype_name(dt), "tie_word_embeddings": not untied}
    with atomic_dir(out, "hf", force=force, protect=protect) as tmp:
        stfile.write_streaming(tmp / "model.safetensors", specs, tensors(), {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp, ("vocab.json", "merges.txt"))
    return out


def _pth_state(model: GPTModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The book's state_dict on the CPU in `dtype`, with the book's `mask` buffers (one shared tensor, which
    gpt2load itself never builds). Tensors already there are not copied, and tensors that share storage (the
    tied head, the mask) stay shared, so torch.save writes them once."""
    cast: dict[tuple, torch.Tensor] = {}
    state = {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.device)
        if key not in cast:
            cast[key] = v.detach().to("cpu", dtype)
        state[k] = cast[key]
    mask = causal_mask(model.cfg.context_length).to(dtype)
    for i in range(len(model.trf_blocks)):
        state[f"trf_blocks.{i}.att.mask"] = mask
    return state


def export_pth(
    model: GPTModel,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    strict: bool = False,
) -> Path:
    """The book's state_dict, for its GPTModel's load_state_dict(strict=True): out_head as the model has it
    (a tied head shares tok_emb's storage, as a tied book model saves) and the book's `mask` buffers, in `dtype`
    (default the model's). `out`, `force`, `protect`, `strict`: as for `save_model`."""
    refuse_quantized(model, "the book's GPTModel cannot hold", "export with dequantize=True (--dequantize)")
    out = Path(out)
    n = model.cfg.context_length
    if n > MAX_PTH_CONTEXT:  # the book's model carries a dense n x n mask: refuse before allocating it
        raise Gpt2LoadError(
            f"the book's .pth layout stores a {n}x{n} attention mask ({4 * n * n / 2**30:.1f} GiB) for a context of "
            f"{n}; export a context over {MAX_PTH_CONTEXT} with --to safetensors or --to hf instead"
        )
    dt = export_dtype(model, dtype)
    check_finite(_as_written(model, dt), out, strict)
    state = _pth_state(model, dt)
    with atomic_output_file(out, "pth", force=force, protect=protect) as tmp:
        torch.save(state, tmp)
    return out


def export(
    model: GPTModel,
    to: str,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    dequantize: bool = False,
    strict: bool = False,
) -> Path:
    """Write `model` as `to` (safetensors, hf, pth, gguf, llmc or nanogpt, a `ckpt.pt`) at `out`.

    Args:
        dtype: float32, bfloat16 or float16 for safetensors/hf/pth/nanogpt (default the model's own); for gguf
            f32, f16 (default), bf16 or q8_0; for llmc float32 or bfloat16 (default the model's own).
        out: a new path, or an empty folder; never a folder or file gpt2load did not write.
        force: replace an earlier gpt2load output of the same format at `out` (only its own files).
        protect: paths (e.g. the source model) that `out` may not be or contain.
        dequantize: write an int8 model's weights as float (hf, pth and gguf hold only floats; safetensors keeps
            int8 unless this is set). The model itself is not changed.
        strict: refuse (a Gpt2LoadError naming the tensor, nothing written) to write NaN or infinite weights,
            which otherwise give one NonFiniteWeightsWarning naming the first and the counts.
    """
    if to not in FORMATS:
        raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
    model = float_model(model, to, True) if dequantize else model
    if to != "safetensors":
        model = float_model(model, to)
    if to == "gguf":
        check_output(out, "gguf", folder=False, force=force, protect=protect)
        path = export_gguf(model, out, tokenizer_dir, gguf_dtype(dtype), strict=strict)
        mark_file(Path(path), "gguf")
        return path
    if to == "safetensors":
        return save_model(model, out, tokenizer_dir, dtype, force=force, protect=protect, strict=strict)
    if to == "hf":
        return export_hf(model, out, tokenizer_dir, dtype, force=force, protect=protect, strict=strict)
    if to == "pth":
        return export_pth(model, out, dtype, force=force, protect=protect, strict=strict)
    if to == "nanogpt":
        return export_nanogpt(model, out, export_dtype(model, dtype), force=force, protect=protect, strict=strict)
    if to == "llmc":
        return export_llmc(model, out, dtype, force=force, protect=protect, strict=strict, tokenizer_dir=tokenizer_dir)
    raise Gpt2LoadError(f"unknown export format {to!r}: use one of {', '.join(FORMATS)}")
