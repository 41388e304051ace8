"""GGUF files of llama.cpp's `gpt2` architecture read back into GPTModel names, memory-mapped by the `gguf`
package's reader.

The name map is the writer's table (`gguf.gguf_names`) read backwards: a fused `attn_qkv` splits into q, k and v
along its output rows. F32, F16 and BF16 tensors are zero-copy views of the file (copy-on-write, so a model that
trains never writes to it); Q8_0 is dequantized to float32 (and `load_gpt2(quantize="int8")` requantizes that
per row as for any float model). The tokenizer is in the metadata (`tokenizer.ggml.tokens` / `.merges`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import tiktoken
import torch

from ..errors import Gpt2LoadError
from ..model.config import GPTConfig
from ..tokenizer import EOT, encoding_from_lists
from .gguf import ARCH, UNTIED_HEAD, gguf_names
from .names import expected_shapes
from .source import Source
from .weightfiles import largest_float

MAGIC = b"GGUF"
# Stored GGML type -> the torch dtype its tensors come out as (Q8_0 dequantized).
TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "Q8_0": torch.float32}
UNUSED_TOKEN = 5  # gguf.TokenType.UNUSED: padding rows beyond the tokenizer ([PAD50257], ...)
_READ_ERRORS = (ValueError, KeyError, IndexError, OverflowError, TypeError, AttributeError)


def _package():
    try:
        import gguf  # optional dependency: only GGUF files need it
    except ImportError:
        raise Gpt2LoadError("reading GGUF needs the 'gguf' package: pip install 'gpt2load[gguf]'") from None
    return gguf


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file starting with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _reader(path: Path):
    gguf = _package()
    try:
        # mode "c": copy-on-write pages, so tensors are writable views and the file is never changed.
        return gguf, gguf.GGUFReader(path, "c")
    except _READ_ERRORS as e:
        raise Gpt2LoadError(f"{path} is not a readable GGUF file ({e}): it may be truncated; get it again") from None


def _value(reader, key: str, path: Path, want: str, default=None):
    """A metadata value of the kind `want` names ("int", "str", "ints", "strs"), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise Gpt2LoadError(f"{path} lacks the GGUF metadata key {key}: it is not a complete gpt2 file")
        return default
    try:
        strings = field.types[-1].name == "STRING"
        vals = [bytes(field.parts[i]).decode("utf-8") if strings else field.parts[i].tolist()[0] for i in field.data]
        is_array = field.types[0].name == "ARRAY"
    except _READ_ERRORS as e:  # UnicodeDecodeError is a ValueError
        raise Gpt2LoadError(f"{path}: GGUF metadata {key} is unreadable ({e}): get the file again") from None
    elem = str if want.startswith("str") else int
    ok = is_array == want.endswith("s") and (is_array or len(vals) == 1)
    if not ok or any(isinstance(v, bool) or not isinstance(v, elem) for v in vals):
        raise Gpt2LoadError(f"{path}: GGUF metadata {key} is not {'a list of ' if is_array else ''}{want}")
    return vals if is_array else vals[0]


def _config(reader, path: Path, n_heads: int | None) -> GPTConfig:
    arch = _value(reader, "general.architecture", path, "str")
    if arch != ARCH:
        raise Gpt2LoadError(
            f"{path} is a GGUF file of architecture {arch!r}: gpt2load reads only GPT-2 ({ARCH!r}) files"
        )
    heads = _value(reader, f"{ARCH}.attention.head_count", path, "int")
    if n_heads is not None and n_heads != heads:
        raise Gpt2LoadError(f"{path} records {heads} attention heads, not the {n_heads} asked for: drop --n-heads")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None or len(emb.shape) != 2:
        raise Gpt2LoadError(f"{path} has no 2-D token_embd.weight: it is not a complete gpt2 file")
    values = {
        "vocab_size": int(emb.shape[1]),  # GGUF lists dimensions innermost first: [d, vocab]
        "context_length": _value(reader, f"{ARCH}.context_length", path, "int"),
        "emb_dim": _value(reader, f"{ARCH}.embedding_length", path, "int"),
        "n_heads": heads,
        "n_layers": _value(reader, f"{ARCH}.block_count", path, "int"),
    }
    try:  # the range checks (and the parameter ceiling) run before anything is read or allocated
        return GPTConfig(**values, qkv_bias=True)  # llama.cpp's gpt2 always has the q/k/v bias (zeros if none)
    except Gpt2LoadError as e:
        raise Gpt2LoadError(f"{path}: {e}") from None


def _layout(cfg: GPTConfig) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """GGUF name -> (GPTModel names it splits into, its torch shape), from the writer's table."""
    shapes = expected_shapes(cfg)
    out = {}
    for gname, parts in gguf_names(cfg.n_layers):
        rows = sum(shapes[p][0] for p in parts)
        out[gname] = (parts, (rows, *shapes[parts[0]][1:]))
    return out


class GGUFSource(Source):
    """A GGUF file of architecture gpt2 (llama.cpp's layout, as gpt2load's own writer and llama.cpp's converter
    make it), memory-mapped once; its tensors checked by name, type and shape when it is opened."""

    kind = "gguf"

    def __init__(self, path: Path, cfg: GPTConfig, gguf, reader) -> None:
        super().__init__(path, cfg, path.parent)
        self._gguf, self._reader = gguf, reader
        self._layout = _layout(cfg)
        self._by_name = {t.name: t for t in reader.tensors}
        self._check()

    def _check(self) -> None:
        """Every tensor expected, known, of a type gpt2load reads and of the config's shape: before any is read."""
        want = {k: s for k, (_, s) in self._layout.items()}
        want[UNTIED_HEAD[0]] = (self.cfg.vocab_size, self.cfg.emb_dim)
        for t in self._reader.tensors:
            if t.name not in want:
                raise Gpt2LoadError(f"tensor {t.name!r} in {self.path} is not part of a GPT-2 model")
            kind = t.tensor_type.name
            if kind not in TYPES:
                raise Gpt2LoadError(
                    f"tensor {t.name!r} in {self.path} is stored as {kind}, which gpt2load does not read: use a "
                    f"{', '.join(TYPES)} file (llama.cpp's converter with --outtype f16 or q8_0)"
                )
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != want[t.name]:
                raise Gpt2LoadError(
                    f"tensor {t.name!r} in {self.path} has shape {list(shape)}, the metadata's config wants "
                    f"{list(want[t.name])}"
                )
        missing = [k for k in self._layout if k not in self._by_name]
        if missing:
            raise Gpt2LoadError(f"{self.path} lacks {missing[:3]}{' and more' if len(missing) > 3 else ''}")

    def _tensor(self, name: str) -> torch.Tensor:
        """One tensor as torch: a view of the file, or (Q8_0) dequantized to float32."""
        t = self._by_name[name]
        kind, data = t.tensor_type.name, t.data
        if kind == "Q8_0":
            data = self._gguf.quants.dequantize(data, t.tensor_type)
        out = torch.from_numpy(np.asarray(data))
        if kind == "BF16":  # numpy has no bfloat16: the reader gives the raw bytes
            out = out.view(torch.bfloat16)
        return out.reshape(self._layout.get(name, ([], (self.cfg.vocab_size, self.cfg.emb_dim)))[1])

    @cached_property
    def _untied(self) -> bool:
        """Whether the file has an output head of its own: llama.cpp's converter writes GPT-2's tied head as a
        copy of token_embd, which is the same head (tied) when its bytes are the embedding's."""
        out = self._by_name.get(UNTIED_HEAD[0])
        if out is None:
            return False
        emb = self._by_name["token_embd.weight"]
        return out.tensor_type != emb.tensor_type or not np.array_equal(out.data, emb.data)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # token_embd first: model_from_tensors takes the model's dtype from the first tensor.
        for gname, (parts, _) in self._layout.items():
            t = self._tensor(gname)
            if len(parts) == 1:
                yield parts[0], t
            else:  # the fused q/k/v projection, split along its output rows
                yield from zip(parts, t.split(t.shape[0] // len(parts), dim=0), strict=True)
        if self._untied:
            yield UNTIED_HEAD[1][0], self._tensor(UNTIED_HEAD[0])

    def dtype(self) -> torch.dtype:
        return largest_float((t.n_elements, TYPES[t.tensor_type.name]) for t in self._reader.tensors)

    def head(self) -> dict | None:
        if not self._untied:
            return None
        return {"tied": False, "shape": [self.cfg.vocab_size, self.cfg.emb_dim], "bias": False}

    def tokenizer(self) -> tiktoken.Encoding:
        """GPT-2's encoding from the file's `tokenizer.ggml.*` metadata (padding rows left out)."""
        return gguf_tokenizer(self.path, self._reader)


def open_gguf(path: str | Path, n_heads: int | None = None) -> GGUFSource:
    """The GGUF file at `path` (architecture gpt2), memory-mapped, its config from the metadata and the token
    embedding; `n_heads`, if given, must agree with the file's head count."""
    path = Path(path)
    gguf, reader = _reader(path)
    return GGUFSource(path, _config(reader, path, n_heads), gguf, reader)


def gguf_tokenizer(path: str | Path, reader=None) -> tiktoken.Encoding:
    """GPT-2's byte-level BPE from a GGUF file's `tokenizer.ggml.tokens` and `.merges`, checked as gpt2load
    checks tokenizer files (the ids must be the merges' ranks)."""
    path = Path(path)
    if reader is None:
        reader = _reader(path)[1]
    model = _value(reader, "tokenizer.ggml.model", path, "str")
    if model != "gpt2":
        raise Gpt2LoadError(f"{path} holds a {model!r} tokenizer, not GPT-2's byte-level BPE: use its own runtime")
    tokens = _value(reader, "tokenizer.ggml.tokens", path, "strs")
    types = _value(reader, "tokenizer.ggml.token_type", path, "ints", [])
    merges = _value(reader, "tokenizer.ggml.merges", path, "strs")
    if types and len(types) != len(tokens):
        raise Gpt2LoadError(f"{path} has {len(tokens)} tokens but {len(types)} token types: get the file again")
    kept = [t for i, t in enumerate(tokens) if not types or types[i] != UNUSED_TOKEN]
    if len(kept) != len(tokens) and kept != tokens[: len(kept)]:
        raise Gpt2LoadError(f"{path} has unused tokens among its vocabulary, not after it: get the file again")
    if EOT not in kept:
        raise Gpt2LoadError(f"{path} has no {EOT} token: it is not GPT-2's vocabulary")
    return encoding_from_lists(path, kept, merges)
