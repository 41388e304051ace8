"""GGUF files for llama.cpp and the GGML runtimes (Ollama, LM Studio, ...), written with the `gguf` package.

llama.cpp's `gpt2` architecture wants q/k/v fused into one [3d, d] projection per block, the learned position
embedding, LayerNorm weight + bias pairs, and GPT-2's byte-level BPE vocabulary and merges in the metadata.
GGUF lists dimensions innermost first, so a numpy array of shape [out, in] (nn.Linear's layout) is recorded
as ne = [in, out], which is what llama.cpp's matrix multiply expects: no transpose is needed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import Gpt2LoadError
from ..model.build import dtype_name
from ..model.gpt import GPTModel
from ..model.quant import refuse_quantized
from ..tokenizer import EOT, EOT_ID, find_tokenizer_files, read_ranks
from .relayout import check_finite
from .stfile import atomic_path

ARCH = "gpt2"
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
LAYER_NORM_EPS = 1e-5  # GPT-2's (LayerNorm in model.py uses the same)

# GGUF tensor name -> the GPTModel tensors it is made of; several parts are concatenated along the output
# dimension (the fused q/k/v projection). In file order: embeddings, each block ("{}" = its number), final norm.
EMBEDDINGS: dict[str, tuple[str, ...]] = {
    "token_embd.weight": ("tok_emb.weight",),
    "position_embd.weight": ("pos_emb.weight",),
}
BLOCK: dict[str, tuple[str, ...]] = {
    "blk.{}.attn_norm.weight": ("trf_blocks.{}.norm1.scale",),
    "blk.{}.attn_norm.bias": ("trf_blocks.{}.norm1.shift",),
    "blk.{}.attn_qkv.weight": tuple(f"trf_blocks.{{}}.att.W_{n}.weight" for n in ("query", "key", "value")),
    "blk.{}.attn_qkv.bias": tuple(f"trf_blocks.{{}}.att.W_{n}.bias" for n in ("query", "key", "value")),
    "blk.{}.attn_output.weight": ("trf_blocks.{}.att.out_proj.weight",),
    "blk.{}.attn_output.bias": ("trf_blocks.{}.att.out_proj.bias",),
    "blk.{}.ffn_norm.weight": ("trf_blocks.{}.norm2.scale",),
    "blk.{}.ffn_norm.bias": ("trf_blocks.{}.norm2.shift",),
    "blk.{}.ffn_up.weight": ("trf_blocks.{}.ff.layers.0.weight",),
    "blk.{}.ffn_up.bias": ("trf_blocks.{}.ff.layers.0.bias",),
    "blk.{}.ffn_down.weight": ("trf_blocks.{}.ff.layers.2.weight",),
    "blk.{}.ffn_down.bias": ("trf_blocks.{}.ff.layers.2.bias",),
}
FINAL: dict[str, tuple[str, ...]] = {
    "output_norm.weight": ("final_norm.scale",),
    "output_norm.bias": ("final_norm.shift",),
}
UNTIED_HEAD = ("output.weight", ("out_head.weight",))  # written only when the head is not tok_emb itself
# Kept in float32 whatever the file type: 1-D tensors (llama.cpp adds them in f32) and the position table,
# which is added to the embeddings rather than multiplied (llama.cpp's own converter keeps it f32 too).
KEEP_F32 = ("position_embd.weight",)


@dataclass(frozen=True)
class _Kind:
    """How one file type stores 2-D weights: the GGML type and the llama file-type code."""

    ggml: str  # a gguf.GGMLQuantizationType name
    file_type: int  # gguf.LlamaFileType value
    quantized: bool = False  # blocks with a scale, made by the gguf package's quantizer


KINDS: dict[str, _Kind] = {
    "f32": _Kind("F32", 0),
    "f16": _Kind("F16", 1),
    "bf16": _Kind("BF16", 32),
    "q8_0": _Kind("Q8_0", 7, quantized=True),
}


_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16"}


def gguf_dtype(dtype: str | torch.dtype | None) -> str:
    """A GGUF file type name (f32, f16, bf16, q8_0) from it or a torch dtype name; default f16."""
    if dtype is None:
        return "f16"
    name = (dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype).lower()
    name = _ALIASES.get(name, name)
    if name not in KINDS:
        raise Gpt2LoadError(f"unknown GGUF dtype {dtype!r}: use one of {', '.join(GGUF_DTYPES)}")
    return name


def _gguf_package():
    """The optional `gguf` package, or a one-line error saying how to install it."""
    try:
        import gguf  # optional dependency: only GGUF export needs it
    except ImportError:
        raise Gpt2LoadError(
            "writing GGUF needs the 'gguf' package: pip install 'gpt2load[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def gguf_names(n_layers: int) -> Iterator[tuple[str, list[str]]]:
    """(GGUF name, GPTModel names it concatenates) for every tensor of the tied model, in file order."""
    yield from ((k, list(v)) for k, v in EMBEDDINGS.items())
    for i in range(n_layers):
        yield from ((k.replace("{}", str(i)), [p.replace("{}", str(i)) for p in v]) for k, v in BLOCK.items())
    yield from ((k, list(v)) for k, v in FINAL.items())


def gguf_tensor_parts(model: GPTModel) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(GGUF name, the GPTModel tensors it concatenates) in file order, without copying anything."""
    state = dict(model.named_parameters(remove_duplicate=False))
    w = model.tok_emb.weight
    if not model.cfg.qkv_bias:  # llama.cpp's gpt2 loads a fused q/k/v bias: zeros stand for the absent ones
        zeros = torch.zeros(model.cfg.emb_dim, dtype=w.dtype, device=w.device)
        for _, names in gguf_names(model.cfg.n_layers):
            for n in names:
                if ".att.W_" in n and n.endswith(".bias"):
                    state.setdefault(n, zeros)
    for gname, names in gguf_names(model.cfg.n_layers):
        missing = [n for n in names if n not in state]
        if missing:
            raise Gpt2LoadError(
                f"the model has no parameter {missing[0]} (adapters or wrapped layers?): merge or unwrap them "
                "into a plain GPTModel before exporting GGUF"
            )
        yield gname, [state[n].detach() for n in names]
    if model.out_head.weight is not model.tok_emb.weight:
        name, (part,) = UNTIED_HEAD
        yield name, [state[part].detach()]


def check_exportable(model: GPTModel) -> None:
    """Refuse models llama.cpp's gpt2 architecture cannot run: a head that does not predict the vocabulary;
    and gpt2load's int8 weights, which are not a GGUF type."""
    refuse_quantized(
        model,
        "GGUF files do not hold in gpt2load's form",
        "export with dequantize=True (--dequantize), or from the float model with --dtype q8_0",
    )
    rows = model.out_head.weight.shape[0]
    if rows != model.cfg.vocab_size or getattr(model.out_head, "bias", None) is not None:
        raise Gpt2LoadError(
            f"the model's output head has {rows} outputs (a classifier?), not one per token of its "
            f"{model.cfg.vocab_size}-token vocabulary: GGUF's gpt2 architecture is a language model; export "
            "a classifier with --to safetensors, hf or pth instead"
        )


def _stored_type(gguf, name: str, shape: tuple[int, ...], kind: _Kind):
    """The GGML type a tensor of this name and shape is stored as in a file of this kind."""
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name in KEEP_F32:
        return q.F32
    qtype = q[kind.ggml]
    if kind.quantized and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return q.F16  # rows that do not split into quantization blocks stay f16 (as llama.cpp does)
    return qtype


def _encoded(gguf, t: torch.Tensor, qtype) -> np.ndarray:
    """One tensor as the bytes GGUF stores for `qtype`."""
    q = gguf.GGMLQuantizationType
    t = t.to("cpu")
    if qtype == q.BF16:  # numpy has no bfloat16: torch rounds (to nearest even) and hands over the raw bytes
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    if qtype in (q.F32, q.F16):
        return t.to(torch.float32 if qtype == q.F32 else torch.float16).contiguous().numpy()
    return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), qtype)


def _vocabulary(tokenizer_dir: str | Path | None, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens in id order, token types, merges) from the model's GPT-2 tokenizer files, sized to the model."""
    found = find_tokenizer_files(tokenizer_dir) if tokenizer_dir else None
    if not found:
        raise Gpt2LoadError(
            f"no GPT-2 tokenizer files (encoder.json + vocab.bpe, or vocab.json + merges.txt) in "
            f"{tokenizer_dir}: GGUF embeds the tokenizer; put them beside the model"
        )
    vocab_path, merges_path = found
    read_ranks(vocab_path, merges_path)  # hashes and vocabulary/merges agreement, with gpt2load's errors
    encoder: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
    tokens = [tok for tok, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    if [encoder[t] for t in tokens] != list(range(len(tokens))) or tokens[EOT_ID : EOT_ID + 1] != [EOT]:
        raise Gpt2LoadError(f"{vocab_path} is not GPT-2's vocabulary (ids must run 0..{EOT_ID}, {EOT} last)")
    if vocab_size < len(tokens):
        raise Gpt2LoadError(
            f"the model has {vocab_size} token embeddings but its tokenizer has {len(tokens)} tokens: llama.cpp "
            "needs one embedding per token, so this model cannot be written as GGUF"
        )
    lines = merges_path.read_text(encoding="utf-8").split("\n")
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    normal, control, unused = 1, 3, 5  # gguf.TokenType values
    types = [control if t == EOT else normal for t in tokens]
    # Rows beyond the tokenizer (a vocabulary padded to a multiple of 64, nanoGPT-style) become unused tokens.
    pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [unused] * pad
    return tokens, types, merges


def export_gguf(
    model: GPTModel,
    out: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "f16",
    name: str = "",
    *,
    strict: bool = False,
) -> Path:
    """Write `model` as a GGUF file that llama.cpp loads as architecture gpt2, one tensor at a time.

    Args:
        model: a GPTModel whose head predicts its vocabulary (tied or not).
        out: the .gguf file; written beside itself and renamed when complete.
        tokenizer_dir: the folder with the model's GPT-2 tokenizer files (embedded in the file).
        dtype: f32, f16 (default), bf16 or q8_0 (quantized by the gguf package); 1-D tensors stay f32.
        name: general.name in the metadata (default: the output file's stem).
        strict: refuse (a Gpt2LoadError naming the tensor, nothing written) NaN or infinite weights as stored
            (f16 overflow included), which otherwise give one NonFiniteWeightsWarning.
    """
    if dtype not in KINDS:
        raise Gpt2LoadError(f"unknown GGUF dtype {dtype!r}: use one of {', '.join(GGUF_DTYPES)}")
    gguf = _gguf_package()
    check_exportable(model)
    kind, cfg, out = KINDS[dtype], model.cfg, Path(out)
    tokens, types, merges = _vocabulary(tokenizer_dir, cfg.vocab_size)
    # The tensor table precedes the data, so every tensor's stored type and size are fixed from its shape
    # first; the data is then encoded and written one tensor at a time.
    plan = []
    for gname, parts in gguf_tensor_parts(model):
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        plan.append((gname, shape, _stored_type(gguf, gname, shape, kind)))
    as_stored = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}
    book = {**dict(gguf_names(cfg.n_layers)), UNTIED_HEAD[0]: list(UNTIED_HEAD[1])}  # named as the model has them
    stored = (
        (f"{gname} ({part_name})", part, as_stored.get(qtype, torch.float32))
        for (gname, parts), (_, _, qtype) in zip(gguf_tensor_parts(model), plan, strict=True)
        for part_name, part in zip(book[gname], parts, strict=True)
    )
    check_finite(stored, out, strict)  # q8_0 blocks are checked as the float32 values they quantize
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _write_metadata(w, gguf, model, kind, name or out.stem, tokens, types, merges)
            for gname, shape, qtype in plan:
                w.add_tensor_info(gname, shape, np.dtype(np.float32), _stored_bytes(gguf, shape, qtype), qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for (_, parts), (_, _, qtype) in zip(gguf_tensor_parts(model), plan, strict=True):
                whole = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                w.write_tensor_data(_encoded(gguf, whole, qtype))
                del whole  # one tensor's copy at a time
            w.flush()
            os.fsync(w.fout[0].fileno())
        finally:
            w.close()
    return out


def _stored_bytes(gguf, shape: tuple[int, ...], qtype) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _write_metadata(w, gguf, model: GPTModel, kind: _Kind, name: str, tokens, types, merges) -> None:
    cfg = model.cfg
    w.add_name(name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(4 * cfg.emb_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    w.add_file_type(kind.file_type)
    if kind.quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer split
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_unk_token_id(EOT_ID)
    w.add_add_bos_token(False)  # GPT-2 prompts start without a BOS token
