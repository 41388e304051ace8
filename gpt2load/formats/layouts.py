"""What a folder or file holds, as one source object per layout: an OpenAI TensorFlow checkpoint, a transformers
folder, gpt2load's own form, the book's .pth. Each opens its files once (lazily, kept on the object) and answers
config, tensors, dtype, head and metadata questions from what it read; `open_source` recognises the layout.

A source serves one load: its tensors are views of the one memory map (or state_dict) it opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..model.config import PRESETS, GPTConfig, read_hf_config, read_hparams, read_json_object
from ..model.lora import ADAPTERS_KEY
from ..model.quant import QUANTIZATIONS
from .names import HF, OPENAI, convert_tensors, expected_shapes, strip_hf_prefix
from .nanogpt import NanoGPTSource, is_nanogpt
from .ownform import CACHE_NAME, OWN_FORMAT
from .source import Source
from .tfcheckpoint import TFCheckpoint, resolve_prefix
from .weightfiles import SafetensorsFile, TorchFile, largest_float

# Files whose presence makes a folder a model folder (rather than, say, the book's `gpt2/` download root).
MODEL_MARKERS = ("config.json", "hparams.json", "checkpoint", "model.ckpt.index", "model.safetensors")
MODEL_MARKERS += ("pytorch_model.bin", CACHE_NAME)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".index")


class OpenAISource(Source):
    """OpenAI's TensorFlow checkpoint (`model.ckpt.*` + hparams.json): its index read once."""

    kind = "openai"
    cacheable = True

    @cached_property
    def checkpoint(self) -> TFCheckpoint:
        return TFCheckpoint(self.path)

    @cached_property
    def _checked(self) -> TFCheckpoint:
        """The checkpoint with every shard present and long enough (a missing or short one is named)."""
        self.checkpoint.check_shards()
        return self.checkpoint

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from convert_tensors(iter(self._checked), OPENAI, self.cfg, str(self.path))

    def dtype(self) -> torch.dtype:
        return largest_float((e.size, e.torch_dtype) for e in self.checkpoint.entries.values())

    def inputs(self) -> list[Path]:
        ck = self._checked
        shards = [ck.shard_path(i) for i in range(ck.num_shards)]
        return [self.path.with_name(self.path.name + ".index"), *shards, *self._configs()]


class HFSource(Source):
    """A transformers GPT2LMHeadModel's weights (model.safetensors or pytorch_model.bin) + config.json."""

    kind = "hf"
    cacheable = True

    def __init__(self, path: Path, cfg: GPTConfig, folder: Path, file: SafetensorsFile | TorchFile) -> None:
        super().__init__(path, cfg, folder)
        self._file = file

    @cached_property
    def _untied_head(self) -> torch.Tensor | None:
        """A stored lm_head that differs from wte (a fine-tuned, untied head), else None (GPT-2's tie)."""
        keep = ("wte.weight", "lm_head.weight")
        head = {k: v for k, v in ((strip_hf_prefix(k), v) for k, v in self._file.tensors().items()) if k in keep}
        lm = _untied_hf_head(head)
        if lm is not None and lm.shape != head.get("wte.weight", lm).shape:
            raise Gpt2LoadError(f"lm_head.weight in {self.path} has shape {list(lm.shape)}, not wte's")
        return lm

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        items = ((strip_hf_prefix(k), v) for k, v in self._file.tensors().items())
        yield from convert_tensors(items, HF, self.cfg, str(self.path))  # the map drops lm_head: tied in GPT-2
        if self._untied_head is not None:
            yield "out_head.weight", self._untied_head

    def dtype(self) -> torch.dtype:
        return self._file.dtype()

    def head(self) -> dict | None:
        lm = self._untied_head
        return None if lm is None else {"tied": False, "shape": list(lm.shape), "bias": False}


def _untied_hf_head(head: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The lm_head of {wte.weight, lm_head.weight} when it differs from wte, else None (GPT-2's tie)."""
    lm, wte = head.get("lm_head.weight"), head.get("wte.weight")
    if lm is None or (wte is not None and lm.shape == wte.shape and torch.equal(lm, wte)):
        return None
    return lm


class OwnSource(Source):
    """gpt2load's own safetensors form (config, head and quantization in its metadata), or a safetensors file
    of a GPTModel state_dict: GPTModel names already, its header parsed once."""

    kind = "own"

    def __init__(self, path: Path, cfg: GPTConfig, folder: Path, file: SafetensorsFile | None = None) -> None:
        super().__init__(path, cfg, folder)
        self._file = file or SafetensorsFile(path)

    @classmethod
    def from_file(cls, path: Path, folder: Path | None = None) -> OwnSource:
        """gpt2load's own file at `path`, its config read from its metadata (its header parsed here, once)."""
        file = SafetensorsFile(path)
        meta = file.header()[1]
        if meta.get("format") != OWN_FORMAT:
            raise Gpt2LoadError(f"{path} is not in gpt2load's own form: convert it again")
        return cls(path, own_config(meta, path), folder or path.parent, file)

    def header(self) -> dict[str, dict]:
        """The tensor entries of the header (name -> dtype, shape, offsets), validated."""
        return self._file.header()[0]

    def stored(self) -> dict[str, torch.Tensor]:
        """Every tensor as the file stores it (an int8 file's weights and scales), zero-copy."""
        return self._file.tensors()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from _own_items(self.stored().items(), self.cfg, str(self.path))

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.stored()

    def dtype(self) -> torch.dtype:
        return self._file.dtype()

    def metadata(self) -> dict[str, str]:
        return self._file.header()[1]

    @cached_property
    def _head(self) -> dict | None:
        raw = self.metadata().get("head")
        try:
            head = json.loads(raw) if raw else None
        except (json.JSONDecodeError, RecursionError):
            head = []  # reported below
        if head is not None and not isinstance(head, dict):
            raise Gpt2LoadError(f"{self.path} has unreadable head metadata: save or convert it again")
        return head

    def head(self) -> dict | None:
        return self._head

    def quantization(self) -> str | None:
        kind = self.metadata().get("quantized")
        if kind is not None and kind not in QUANTIZATIONS:
            raise Gpt2LoadError(
                f"{self.path} records quantization {kind!r}, which this gpt2load cannot load: upgrade it"
            )
        return kind

    def adapters(self) -> Path | None:
        name = self.metadata().get(ADAPTERS_KEY)
        if name is None:
            return None
        path = self.path.parent / name
        if not path.is_file():
            raise Gpt2LoadError(
                f"{self.path} was saved with its LoRA adapters in {path}, which is missing: put it back or "
                "fine-tune again"
            )
        return path


class BookSource(Source):
    """The book's `torch.save(model.state_dict())` (.pth): GPTModel names, loaded once."""

    kind = "pth"

    def __init__(self, path: Path, cfg: GPTConfig, folder: Path, file: TorchFile) -> None:
        super().__init__(path, cfg, folder)
        self._file = file

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from _own_items(self._file.tensors().items(), self.cfg, str(self.path))

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self._file.tensors()

    def dtype(self) -> torch.dtype:
        return self._file.dtype()


def _own_items(items: Iterable[tuple[str, torch.Tensor]], cfg: GPTConfig, where: str):
    """GPTModel-named tensors, checked against the config; the head may be absent (tied), the model's own
    [vocab, d] or any other [n, d] with or without a bias [n] (a classifier); the book's masks are skipped."""
    shapes = expected_shapes(cfg)
    seen = set()
    for name, t in items:
        if name.endswith(".att.mask"):
            continue  # the book's buffer: rebuilt by nobody, SDPA masks by itself
        if name in ("out_head.weight", "out_head.bias"):
            want = (None, cfg.emb_dim) if name.endswith("weight") else (None,)
            if t.dim() != len(want) or (len(want) == 2 and t.shape[1] != cfg.emb_dim):
                raise Gpt2LoadError(
                    f"tensor {name!r} in {where} has shape {list(t.shape)}: not a head for width {cfg.emb_dim}"
                )
            yield name, t
            continue
        if name not in shapes:
            if ".att.W_" in name and name.endswith(".bias") and not cfg.qkv_bias:
                raise Gpt2LoadError(
                    f"{where} holds q/k/v biases ({name}) but its config says qkv_bias false: fix the config "
                    "(the biases would be lost)"
                )
            raise Gpt2LoadError(f"tensor {name!r} in {where} is not a GPTModel parameter")
        if tuple(t.shape) != shapes[name]:
            raise Gpt2LoadError(
                f"tensor {name!r} in {where} has shape {list(t.shape)}, the config wants {list(shapes[name])}"
            )
        seen.add(name)
        yield name, t
    missing = [k for k in shapes if k not in seen]
    if missing:
        raise Gpt2LoadError(f"{where} lacks {missing[:3]}{' and more' if len(missing) > 3 else ''}: it is incomplete")


def own_config(meta: dict[str, str], path: Path) -> GPTConfig:
    try:
        raw = json.loads(meta["config"])
    except (KeyError, ValueError, RecursionError):
        raise Gpt2LoadError(f"{path} lacks gpt2load's config metadata: convert it again") from None
    return _config_dict(raw, path)


def _config_dict(raw: object, path: Path) -> GPTConfig:
    """A GPTConfig from gpt2load's own config dict, with any problem reported against `path`."""
    try:
        return GPTConfig.from_dict(raw)  # type: ignore[arg-type]
    except Gpt2LoadError as e:
        raise Gpt2LoadError(f"{path}: {e}") from None


def _book_config(shapes: dict[str, tuple[int, ...]], path: Path, n_heads: int | None = None) -> GPTConfig:
    """The architecture of a book-layout state_dict, read off its tensors: vocabulary and width from tok_emb,
    context length from pos_emb, q/k/v biases from their presence, heads from the preset of that width (or
    `n_heads`, which a width no preset has needs)."""
    try:
        vocab, d = shapes["tok_emb.weight"]
        ctx = shapes["pos_emb.weight"][0]
    except (KeyError, ValueError):
        raise Gpt2LoadError(f"{path} does not hold a GPTModel state_dict (no tok_emb/pos_emb)") from None
    layers = len({k.split(".")[1] for k in shapes if k.startswith("trf_blocks.")})
    heads = n_heads or {c.emb_dim: c.n_heads for c in PRESETS.values()}.get(d)
    if heads is None:
        raise Gpt2LoadError(
            f"{path}: emb_dim {d} is not a GPT-2 size, so the head count is unknown: pass --n-heads N "
            "(n_heads= in Python) or save the model in gpt2load's own form, which records the config"
        )
    bias = "trf_blocks.0.att.W_query.bias" in shapes
    return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=d, n_heads=heads, n_layers=layers, qkv_bias=bias)


def open_source(path: str | Path, n_heads: int | None = None) -> Source:
    """The model at `path` (a folder or a weights file), recognised by its layout, its tensors not yet read.

    `n_heads` is used by book-layout files (state_dicts without a config) of a width no GPT-2 preset has."""
    p = Path(path)
    if not p.exists() and not Path(str(p) + ".index").exists():
        raise Gpt2LoadError(f"{p} does not exist: give a model size (124M, 355M, 774M, 1558M) or a model folder")
    if p.is_file() or Path(str(p) + ".index").exists():
        return _open_file(p, n_heads)
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        raw = read_json_object(cfg_file)
        if raw.get("model_type") == OWN_FORMAT:
            return OwnSource(p / "model.safetensors", _config_dict(raw.get("config"), cfg_file), p)
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                weights = p / name
                file = SafetensorsFile(weights) if weights.suffix == ".safetensors" else TorchFile(weights)
                return HFSource(weights, read_hf_config(cfg_file), p, file)
    if (p / "model.ckpt.index").is_file() or (p / "checkpoint").is_file():
        if not (p / "hparams.json").is_file():
            raise Gpt2LoadError(f"{p} has a TensorFlow checkpoint but no hparams.json: download the model again")
        return OpenAISource(resolve_prefix(p), read_hparams(p / "hparams.json"), p)
    if (p / CACHE_NAME).is_file():
        return _open_file(p / CACHE_NAME)
    raise Gpt2LoadError(
        f"{p} holds no model gpt2load knows: expected model.ckpt.* + hparams.json (OpenAI), "
        "config.json + model.safetensors (Hugging Face), or a gpt2load export"
    )


def _magic(p: Path) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(8)
    except OSError:
        return b""


def _open_file(p: Path, n_heads: int | None = None) -> Source:
    # Formats with a magic number are recognised by content, whatever their suffix.
    magic = _magic(p) if p.is_file() else b""
    if magic[:4] == b"GGUF":
        from .ggufread import open_gguf

        return open_gguf(p, n_heads)
    if magic[:4] == (20240326).to_bytes(4, "little"):  # llm.c's model file
        from .llmc import open_llmc

        return open_llmc(p)
    if p.suffix == ".index" or Path(str(p) + ".index").exists():
        prefix = p.with_suffix("") if p.suffix == ".index" else p
        return OpenAISource(prefix, read_hparams(prefix.parent / "hparams.json"), prefix.parent)
    if p.suffix == ".safetensors":
        st = SafetensorsFile(p)
        header, meta = st.header()
        if meta.get("format") == OWN_FORMAT:
            return OwnSource(p, own_config(meta, p), p.parent, st)
        if "tok_emb.weight" in header:
            shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            return OwnSource(p, _book_config(shapes, p, n_heads), p.parent, st)
        return HFSource(p, read_hf_config(p.parent / "config.json"), p.parent, st)
    if p.suffix in (".pth", ".pt", ".bin"):
        tf = TorchFile(p)
        if is_nanogpt(tf.raw()):  # a dict with "model" and nanoGPT's training keys, whatever the suffix
            return NanoGPTSource.from_file(p, tf)
        state = tf.tensors()
        if "tok_emb.weight" in state:
            return BookSource(p, _book_config({k: tuple(v.shape) for k, v in state.items()}, p, n_heads), p.parent, tf)
        return HFSource(p, read_hf_config(p.parent / "config.json"), p.parent, tf)
    raise Gpt2LoadError(f"{p}: unknown weights file type (expected .safetensors, .pth, .bin or .index)")
