"""llm.c's model files (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`), read and written.

The layout, as llm.c's `train_gpt2.py` writes it and `train_gpt2.c` reads it: a header of 256 little-endian
int32 (magic 20240326, version 3 = every tensor float32 or 5 = every tensor bfloat16, max positions,
vocabulary, layers, heads, width, padded vocabulary), then each kind of tensor stacked over the layers, the
token embedding first with its rows padded (zeros) to the padded vocabulary. Projections are nn.Linear
[out, in], and the head is tied to the token embedding.

The padded rows are kept: the model's vocab_size is the padded size (ids past the tokenizer decode as
markers), and the real vocabulary is in the source's metadata.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..fsutil import atomic_output_file, atomic_path, mark_file, owned_format
from ..model.build import dtype_name, pick_dtype
from ..model.config import GPTConfig
from ..model.gpt import GPTModel, stored_state
from ..model.quant import refuse_quantized
from ..tokenizer import find_tokenizer_files, tokenizer_from_folder
from .names import expected_shapes
from .relayout import check_finite
from .source import Source

MAGIC = 20240326
DTYPES = {3: torch.float32, 5: torch.bfloat16}  # llm.c's version -> the dtype of every tensor
VERSIONS = {dt: v for v, dt in DTYPES.items()}
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
PAD_MULTIPLE = 128  # llm.c pads the vocabulary to a multiple of 128 (50257 -> 50304)
GPT2_VOCAB = 50257
TOKENIZER_MAGIC = 20240328  # llm.c's gpt2_tokenizer.bin: version 2 carries the EOT id in the header
TOKENIZER_VERSION = 2
TOKENIZER_NAME = "gpt2_tokenizer.bin"

_QKV = ("query", "key", "value")
# llm.c's tensors in file order: its name, the GPTModel names it fills ("{}" is the layer; three names: the
# fused q/k/v, split in equal parts along the output dimension), and whether it is stacked over the layers.
LAYOUT: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("wte", ("tok_emb.weight",), False),
    ("wpe", ("pos_emb.weight",), False),
    ("ln1w", ("trf_blocks.{}.norm1.scale",), True),
    ("ln1b", ("trf_blocks.{}.norm1.shift",), True),
    ("qkvw", tuple(f"trf_blocks.{{}}.att.W_{n}.weight" for n in _QKV), True),
    ("qkvb", tuple(f"trf_blocks.{{}}.att.W_{n}.bias" for n in _QKV), True),
    ("attprojw", ("trf_blocks.{}.att.out_proj.weight",), True),
    ("attprojb", ("trf_blocks.{}.att.out_proj.bias",), True),
    ("ln2w", ("trf_blocks.{}.norm2.scale",), True),
    ("ln2b", ("trf_blocks.{}.norm2.shift",), True),
    ("fcw", ("trf_blocks.{}.ff.layers.0.weight",), True),
    ("fcb", ("trf_blocks.{}.ff.layers.0.bias",), True),
    ("fcprojw", ("trf_blocks.{}.ff.layers.2.weight",), True),
    ("fcprojb", ("trf_blocks.{}.ff.layers.2.bias",), True),
    ("lnfw", ("final_norm.scale",), False),
    ("lnfb", ("final_norm.shift",), False),
)


def entries(cfg: GPTConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(GPTModel name, shape) of every tensor of an llm.c file of `cfg` (vocab_size = the padded size), in file
    order: q/k/v biases always (llm.c's c_attn has one)."""
    shapes = expected_shapes(replace(cfg, qkv_bias=True))
    for _, names, stacked in LAYOUT:
        for i in range(cfg.n_layers) if stacked else (None,):
            for name in names:
                full = name.format(i) if i is not None else name
                yield full, shapes[full]


def padded_vocab(vocab: int) -> int:
    return -(-vocab // PAD_MULTIPLE) * PAD_MULTIPLE


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise Gpt2LoadError(f"{path} could not be read ({e.strerror}): check the path and its permissions") from None


def read_header(path: Path) -> tuple[int, GPTConfig, int]:
    """(version, config with the padded vocabulary, real vocabulary) from an llm.c file's header, every value
    and the file's size checked against what they imply before anything else is read."""
    size = _size(path)
    if size < HEADER_BYTES:
        raise Gpt2LoadError(f"{path} is truncated: {size} bytes, less than llm.c's {HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        header = struct.unpack(f"<{HEADER_INTS}i", f.read(HEADER_BYTES))
    magic, version, ctx, vocab, layers, heads, width, padded = header[:8]
    if magic != MAGIC:
        raise Gpt2LoadError(f"{path} is not an llm.c model file: magic number {magic}, expected {MAGIC}")
    if version not in DTYPES:
        raise Gpt2LoadError(
            f"{path} is an llm.c model file of version {version}, which gpt2load does not read (3: float32, "
            "5: bfloat16): write it again with a current llm.c train_gpt2.py"
        )
    if not 1 <= vocab <= padded:
        raise Gpt2LoadError(
            f"{path} has a corrupt llm.c header: vocabulary {vocab} and padded vocabulary {padded} (need 1 <= "
            "vocabulary <= padded)"
        )
    try:
        cfg = GPTConfig(vocab_size=padded, context_length=ctx, emb_dim=width, n_heads=heads, n_layers=layers)
    except Gpt2LoadError as e:
        raise Gpt2LoadError(f"{path} has a corrupt llm.c header: {e}") from None
    want = HEADER_BYTES + cfg.n_params * DTYPES[version].itemsize  # the same count llm.c's layout holds
    if size != want:
        state = "truncated" if size < want else "longer than its header says"
        raise Gpt2LoadError(
            f"{path} is {state}: {size:,} bytes, its llm.c header describes {want:,}; download or write it again"
        )
    return version, cfg, vocab


class LlmcSource(Source):
    """An llm.c model file: its header read once when opened, its tensors views of one private memory map."""

    kind = "llmc"

    def __init__(self, path: Path, cfg: GPTConfig, version: int, vocab: int) -> None:
        super().__init__(path, cfg, path.parent)
        self.version, self.vocab = version, vocab

    @cached_property
    def _map(self) -> mmap.mmap:
        with open(self.path, "rb") as f:
            # ACCESS_COPY: private and writable, so torch.frombuffer accepts it; training copies touched pages.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(mm) != HEADER_BYTES + self.cfg.n_params * self.dtype().itemsize:
            raise Gpt2LoadError(f"{self.path} changed while it was being read: load it again")
        return mm

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        mm, dt, offset = self._map, self.dtype(), HEADER_BYTES
        for name, shape in entries(self.cfg):
            count = math.prod(shape)
            # each tensor its own storage (saving one saves only its bytes); q, k, v stay adjacent in memory
            yield name, torch.frombuffer(mm, dtype=dt, count=count, offset=offset).view(shape)
            offset += count * dt.itemsize

    def dtype(self) -> torch.dtype:
        return DTYPES[self.version]

    def metadata(self) -> dict[str, str]:
        return {
            "llmc_version": str(self.version),
            "llmc_vocab_size": str(self.vocab),
            "llmc_padded_vocab_size": str(self.cfg.vocab_size),
        }

    def inputs(self) -> list[Path]:
        return [self.path]


def open_llmc(path: str | Path) -> LlmcSource:
    """The llm.c model file at `path` (versions 3 and 5), its header checked against its size."""
    p = Path(path)
    version, cfg, vocab = read_header(p)
    return LlmcSource(p, cfg, version, vocab)


def _llmc_dtype(model: GPTModel, dtype: str | torch.dtype | None) -> torch.dtype:
    short = {"f32": "float32", "bf16": "bfloat16"}
    dt = model.pos_emb.weight.dtype if dtype is None else pick_dtype(short.get(dtype, dtype))  # type: ignore[arg-type]
    if dt not in VERSIONS:
        raise Gpt2LoadError(f"llm.c's files hold float32 or bfloat16, not {dtype_name(dt)}: pass --dtype float32")
    return dt


def export_llmc(
    model: GPTModel,
    out: str | Path,
    dtype: str | torch.dtype | None = None,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    strict: bool = False,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write `model` as llm.c's model file (version 3 for float32, 5 for bfloat16; default the model's dtype,
    float32 when that is neither), tensor by tensor. The vocabulary is padded with zero rows to a multiple of
    128; the header's vocabulary is the model's without trailing all-zero rows (llm.c's padding, in a model
    read from llm.c) and at most GPT-2's 50257 (a padded nanoGPT model's extra rows stay, as padding). A model
    without q/k/v biases gets zero biases. The head must be tied (llm.c has no other). `out`, `force`,
    `protect`, `strict`: as for exports.save_model. When `tokenizer_dir` has GPT-2 tokenizer files, llm.c's
    `gpt2_tokenizer.bin` is written beside the file too (never over a file gpt2load did not write)."""
    refuse_quantized(model, "llm.c's files cannot hold", "export with dequantize=True (--dequantize)")
    out = Path(out)
    if dtype is None and model.pos_emb.weight.dtype not in VERSIONS:
        dtype = torch.float32
    dt = _llmc_dtype(model, dtype)
    if not model.head_meta()["tied"]:
        raise Gpt2LoadError(
            "llm.c ties the output head to the token embedding, and this model's head is its own: export with "
            "--to safetensors or --to pth instead"
        )
    cfg = model.real_config()
    state = stored_state(model)
    vocab, padded = _real_vocab(state.get("tok_emb.weight"), cfg.vocab_size), padded_vocab(cfg.vocab_size)
    for name, want in entries(replace(cfg, vocab_size=padded)):
        have = state.get(name)
        if name == "tok_emb.weight" and have is not None:
            want = (cfg.vocab_size, cfg.emb_dim)
        if have is None and ".att.W_" in name and name.endswith(".bias") and not cfg.qkv_bias:
            continue
        if not isinstance(have, torch.Tensor) or tuple(have.shape) != want:
            raise Gpt2LoadError(f"the model has no {name} of shape {list(want)} for llm.c's layout: merge adapters")
    written = dict(entries(cfg))
    check_finite(((k, v, dt) for k, v in state.items() if k in written), out, strict)
    header = [MAGIC, VERSIONS[dt], cfg.context_length, vocab, cfg.n_layers, cfg.n_heads, cfg.emb_dim, padded]
    with atomic_output_file(out, "llmc", force=force, protect=protect) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack(f"<{HEADER_INTS}i", *header, *[0] * (HEADER_INTS - len(header))))
        for name, shape in entries(replace(cfg, vocab_size=padded)):
            t = state.get(name)
            t = torch.zeros(shape, dtype=dt) if t is None else t.detach().to("cpu", dt).contiguous()
            _write(f, t)
            if name == "tok_emb.weight" and padded > cfg.vocab_size:  # llm.c's zero rows
                _write(f, torch.zeros(padded - cfg.vocab_size, cfg.emb_dim, dtype=dt))
    blob = _tokenizer_blob(tokenizer_dir)
    if blob is not None:
        _write_tokenizer(out.parent / TOKENIZER_NAME, blob)
    return out


def _notice(message: str) -> None:
    print(f"gpt2load: notice: {message}", file=sys.stderr)


def _tokenizer_blob(tokenizer_dir: str | Path | None) -> bytes | None:
    """llm.c's tokenizer file for the tokenizer in `tokenizer_dir` (as train_gpt2.py's write_tokenizer
    writes it: 256 int32, then each id's bytes after a uint8 length), or None when there is none."""
    if tokenizer_dir is None or not find_tokenizer_files(tokenizer_dir):
        return None
    try:
        enc = tokenizer_from_folder(tokenizer_dir)
    except Gpt2LoadError as e:
        _notice(f"{TOKENIZER_NAME} not written: {e}")
        return None
    n, eot = enc.n_vocab, enc.eot_token
    parts = [struct.pack(f"<{HEADER_INTS}i", TOKENIZER_MAGIC, TOKENIZER_VERSION, n, eot, *[0] * (HEADER_INTS - 4))]
    for i in range(n):
        try:
            b = enc.decode_single_token_bytes(i)
        except KeyError:  # llm.c's file has a token for every id
            _notice(f"{TOKENIZER_NAME} not written: the tokenizer has no token {i}")
            return None
        if len(b) > 255:  # llm.c stores each length in one byte
            _notice(f"{TOKENIZER_NAME} not written: token {i} is {len(b)} bytes, more than llm.c's 255")
            return None
        parts.append(bytes([len(b)]) + b)
    return b"".join(parts)


def _write_tokenizer(path: Path, blob: bytes) -> None:
    # a file gpt2load did not write there (llm.c's own, say) is the user's: left as it is
    if os.path.lexists(path) and (path.is_symlink() or owned_format(path) != "llmc-tokenizer"):
        _notice(f"{path} exists and gpt2load did not write it: left as it is")
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    mark_file(path, "llmc-tokenizer")


def _real_vocab(emb: torch.Tensor | None, vocab: int) -> int:
    """The vocabulary the header names: at most GPT-2's, and without trailing all-zero rows (padding, as in a
    model read from llm.c), so a file read and written again keeps its header."""
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        return vocab  # refused by the shape check
    nonzero = emb.detach()[:vocab].ne(0).any(dim=1).nonzero()
    used = int(nonzero[-1]) + 1 if len(nonzero) else vocab
    return min(vocab, GPT2_VOCAB, used)


def _write(f, t: torch.Tensor) -> None:
    # numpy has no bfloat16: its bytes go out as int16, unchanged
    f.write((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().data)


__all__ = ["LlmcSource", "entries", "export_llmc", "open_llmc", "read_header"]
