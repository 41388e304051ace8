"""What a folder or file holds (OpenAI checkpoint, Hugging Face folder, gpt2load's own form, book .pth): its
config, its tensors in GPTModel names, and the writer of gpt2load's own safetensors form."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats import stfile
from gpt2load.formats.names import HF, OPENAI, convert_tensors, expected_shapes, strip_hf_prefix
from gpt2load.formats.tfcheckpoint import TFCheckpoint, resolve_prefix
from gpt2load.model.build import dtype_name
from gpt2load.model.config import PRESETS, GPTConfig, read_hf_config, read_hparams, read_json_object
from gpt2load.model.quant import quantized_names

CACHE_NAME = "gpt2load.safetensors"  # the converted weights file (in gpt2load's cache folder, or a user's export)
OWN_FORMAT = "gpt2load"
# Files whose presence makes a folder a model folder (rather than, say, the book's `gpt2/` download root).
MODEL_MARKERS = ("config.json", "hparams.json", "checkpoint", "model.ckpt.index", "model.safetensors")
MODEL_MARKERS += ("pytorch_model.bin", CACHE_NAME)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".index")


@dataclass
class Source:
    """A model on disk: its layout, its architecture, and the files conversion depends on."""

    kind: str  # "openai", "hf", "own", "pth"
    path: Path  # the weights file (or checkpoint prefix)
    cfg: GPTConfig
    folder: Path

    def inputs(self) -> list[Path]:
        configs = [self.folder / n for n in ("hparams.json", "config.json") if (self.folder / n).is_file()]
        if self.kind == "openai":
            ck = TFCheckpoint(self.path)
            ck.check_shards()  # a missing or short shard is the user's problem to hear about, by name
            shards = [ck.shard_path(i) for i in range(ck.num_shards)]
            return [self.path.with_name(self.path.name + ".index"), *shards, *configs]
        return [self.path, *configs]


def _hf_weights(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


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
            f"{path}: emb_dim {d} is not a GPT-2 size, so the head count is unknown: pass n_heads= to load_gpt2 "
            "or save the model in gpt2load's own form, which records the config"
        )
    bias = "trf_blocks.0.att.W_query.bias" in shapes
    return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=d, n_heads=heads, n_layers=layers, qkv_bias=bias)


def inspect_path(path: str | Path, n_heads: int | None = None) -> Source:
    """Recognise the model at `path` (a folder or a weights file) without reading its tensors.

    `n_heads` is used by book-layout files (state_dicts without a config) of a width no GPT-2 preset has."""
    p = Path(path)
    if not p.exists() and not Path(str(p) + ".index").exists():
        raise Gpt2LoadError(f"{p} does not exist: give a model size (124M, 355M, 774M, 1558M) or a model folder")
    if p.is_file() or Path(str(p) + ".index").exists():
        return _inspect_file(p, n_heads)
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        raw = read_json_object(cfg_file)
        if raw.get("model_type") == OWN_FORMAT:
            return Source("own", p / "model.safetensors", _config_dict(raw.get("config"), cfg_file), p)
        weights = _hf_weights(p)
        if weights is not None:
            return Source("hf", weights, read_hf_config(cfg_file), p)
    if (p / "model.ckpt.index").is_file() or (p / "checkpoint").is_file():
        if not (p / "hparams.json").is_file():
            raise Gpt2LoadError(f"{p} has a TensorFlow checkpoint but no hparams.json: download the model again")
        return Source("openai", resolve_prefix(p), read_hparams(p / "hparams.json"), p)
    if (p / CACHE_NAME).is_file():
        return _inspect_file(p / CACHE_NAME)
    raise Gpt2LoadError(
        f"{p} holds no model gpt2load knows: expected model.ckpt.* + hparams.json (OpenAI), "
        "config.json + model.safetensors (Hugging Face), or a gpt2load export"
    )


def _inspect_file(p: Path, n_heads: int | None = None) -> Source:
    if p.suffix == ".index" or Path(str(p) + ".index").exists():
        prefix = p.with_suffix("") if p.suffix == ".index" else p
        return Source("openai", prefix, read_hparams(prefix.parent / "hparams.json"), prefix.parent)
    if p.suffix == ".safetensors":
        header, meta = stfile.read_header(p)
        if meta.get("format") == OWN_FORMAT:
            return Source("own", p, own_config(meta, p), p.parent)
        if "tok_emb.weight" in header:
            shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            return Source("own", p, _book_config(shapes, p, n_heads), p.parent)
        return Source("hf", p, read_hf_config(p.parent / "config.json"), p.parent)
    if p.suffix in (".pth", ".pt", ".bin"):
        state = _torch_load(p)
        if "tok_emb.weight" in state:
            return Source("pth", p, _book_config({k: tuple(v.shape) for k, v in state.items()}, p, n_heads), p.parent)
        return Source("hf", p, read_hf_config(p.parent / "config.json"), p.parent)
    raise Gpt2LoadError(f"{p}: unknown weights file type (expected .safetensors, .pth, .bin or .index)")


def _torch_load(p: Path) -> dict[str, torch.Tensor]:
    # torch.save's zip format can be memory-mapped (zero-copy); the legacy format (torch < 1.6, many older
    # pytorch_model.bin files, `_use_new_zipfile_serialization=False`) cannot, and is read into memory.
    mmap = zipfile.is_zipfile(p)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for a bad file
        raise Gpt2LoadError(
            f"{p} could not be read as a PyTorch state_dict ({type(e).__name__}): is it complete?"
        ) from None
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's chapter-5 checkpoint
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise Gpt2LoadError(
            f"{p} holds a {type(state).__name__}, not a state_dict: save model.state_dict() (a dict of tensors)"
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise Gpt2LoadError(
                f"{p} is not a plain state_dict: entry {key!r} holds a {type(value).__name__}, not a tensor; "
                "save model.state_dict()"
            )
    return state


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ST_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def source_dtype(src: Source) -> torch.dtype:
    """The floating dtype a source stores its weights in (that of its largest tensor), read from headers."""
    if src.kind == "openai":
        sizes = [(e.size, e.torch_dtype) for e in TFCheckpoint(src.path).entries.values()]
    elif src.path.suffix == ".safetensors":
        header, _ = stfile.read_header(src.path)
        sizes = [(e["data_offsets"][1] - e["data_offsets"][0], _ST_FLOATS.get(e["dtype"])) for e in header.values()]
    else:
        sizes = [(t.nbytes, t.dtype) for t in _torch_load(src.path).values() if isinstance(t, torch.Tensor)]
    floats = [(n, d) for n, d in sizes if d in FLOAT_DTYPES]
    return max(floats, key=lambda nd: nd[0])[1] if floats else torch.float32


def source_tensors(src: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors in GPTModel names, one at a time, with coverage and shape checks."""
    where = str(src.path)
    if src.kind == "openai":
        ck = TFCheckpoint(src.path)
        ck.check_shards()
        yield from convert_tensors(iter(ck), OPENAI, src.cfg, where)
    elif src.kind == "hf":
        if src.path.suffix == ".safetensors":
            items = ((strip_hf_prefix(k), v) for k, v in stfile.mmap_tensors(src.path).items())
        else:
            items = ((strip_hf_prefix(k), v) for k, v in _torch_load(src.path).items())
        head: dict[str, torch.Tensor] = {}
        yield from convert_tensors(_hf_head(items, head), HF, src.cfg, where)
        lm = _untied_hf_head(head)
        if lm is not None:
            if lm.shape != head.get("wte.weight", lm).shape:
                raise Gpt2LoadError(f"lm_head.weight in {where} has shape {list(lm.shape)}, not wte's")
            yield "out_head.weight", lm
    else:  # own form or book .pth: already GPTModel names
        items = stfile.mmap_tensors(src.path).items() if src.kind == "own" else _torch_load(src.path).items()
        yield from _own_items(items, src.cfg, where)


def _hf_head(items, head: dict[str, torch.Tensor]):
    """Pass HF tensors through, keeping wte and lm_head aside in `head` (references, not copies)."""
    for name, t in items:
        if name in ("wte.weight", "lm_head.weight"):
            head[name] = t
        yield name, t


def _untied_hf_head(head: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A stored lm_head that differs from wte (a fine-tuned, untied head), else None (GPT-2's tie)."""
    lm, wte = head.get("lm_head.weight"), head.get("wte.weight")
    if lm is None or (wte is not None and lm.shape == wte.shape and torch.equal(lm, wte)):
        return None
    return lm


def hf_head_meta(src: Source) -> dict | None:
    """The head an HF source holds, as `head_meta` records it: None when tied (GPT-2's layout)."""
    if src.kind != "hf":
        return None
    if src.path.suffix == ".safetensors":
        state = stfile.mmap_tensors(src.path)
    else:
        state = _torch_load(src.path)
    head = {
        k: v for k, v in ((strip_hf_prefix(k), v) for k, v in state.items()) if k in ("wte.weight", "lm_head.weight")
    }
    lm = _untied_hf_head(head)
    return None if lm is None else {"tied": False, "shape": list(lm.shape), "bias": False}


def _own_items(items, cfg: GPTConfig, where: str):
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


def head_shapes(cfg: GPTConfig, head: dict | None) -> dict[str, tuple[int, ...]]:
    """The head tensors a file stores for `head` (as `GPTModel.head_meta()` describes it): none when tied."""
    if not head or head.get("tied", True):
        return {}
    out, d = head.get("shape", [cfg.vocab_size, cfg.emb_dim])
    return {"out_head.weight": (out, d), **({"out_head.bias": (out,)} if head.get("bias") else {})}


def write_own(
    path: Path,
    cfg: GPTConfig,
    tensors,
    extra_meta: dict[str, str] | None = None,
    progress=None,
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
