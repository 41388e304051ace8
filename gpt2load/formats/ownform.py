"""The writer of gpt2load's own form: one safetensors file of GPTModel tensors whose metadata records the config,
dtype, head and quantization, so it loads back with nothing else beside it (exports and the conversion cache)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..model.build import dtype_name
from ..model.config import GPTConfig
from ..model.quant import quantized_names
from . import stfile
from .names import expected_shapes

CACHE_NAME = "gpt2load.safetensors"  # the converted weights file (in gpt2load's cache folder, or a user's export)
OWN_FORMAT = "gpt2load"  # the `format` metadata value (and config.json `model_type`) that marks the form


def head_shapes(cfg: GPTConfig, head: dict | None) -> dict[str, tuple[int, ...]]:
    """The head tensors a file stores for `head` (as `GPTModel.head_meta()` describes it): none when tied."""
    if not head or head.get("tied", True):
        return {}
    out, d = head.get("shape", [cfg.vocab_size, cfg.emb_dim])
    return {"out_head.weight": (out, d), **({"out_head.bias": (out,)} if head.get("bias") else {})}


def write_own(
    path: Path,
    cfg: GPTConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    extra_meta: dict[str, str] | None = None,
    progress: Callable[[int], object] | None = None,
    head: dict | None = None,
    dtype: torch.dtype = torch.float32,
    quantized: str | None = None,
    float_embedding: bool = False,
) -> None:
    """Write GPTModel tensors as gpt2load's own safetensors file, each cast to `dtype` as it is written. A tied
    head is stored once (as tok_emb); any other head (`head`, as `GPTModel.head_meta()` gives it) is stored and
    recorded. `quantized` ("int8"): the Linear weights and the token embedding (unless `float_embedding`, a
    model loaded from a 0.x file) are stored as int8 + scales (see `quant.quantized_names`), and recorded."""
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, head)}
    specs = {k: (s, dtype) for k, s in shapes.items()}
    meta = {"format": OWN_FORMAT, "config": json.dumps(cfg.to_dict()), "dtype": dtype_name(dtype)}
    meta.update(extra_meta or {})
    if head is not None:
        meta["head"] = json.dumps(head)
    if quantized is not None:
        specs = quantized_names(shapes, shapes, embedding=not float_embedding)
        # int8 matrices first, from the aligned start of the data: the int8 kernel reads them in place when
        # their sizes keep the next one aligned (all GPT-2 widths are multiples of 64)
        specs = dict(sorted(specs.items(), key=lambda kv: kv[1][1] != torch.int8))
        meta["quantized"] = quantized
    stfile.write_streaming(path, specs, tensors, meta, progress)
