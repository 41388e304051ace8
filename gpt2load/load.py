"""Find out what a folder or file holds (OpenAI checkpoint, Hugging Face, gpt2load's own form, book .pth)
and turn it into a GPTModel, converting once into a cached safetensors file."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import stfile
from .build import model_from_tensors
from .config import PRESETS, GPTConfig, read_hf_config, read_hparams, resolve_size
from .convert import HF, OPENAI, convert_tensors, expected_shapes, strip_hf_prefix
from .errors import Gpt2LoadError
from .lora import ADAPTERS_KEY, load_adapters
from .model import GPTModel, is_derived
from .tfcheckpoint import TFCheckpoint

CACHE_NAME = "gpt2load.safetensors"  # converted weights, beside the files they came from
OWN_FORMAT = "gpt2load"


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


def fingerprint(paths: list[Path]) -> str:
    """A cheap identity of the source files (name, size, mtime): the cache is stale when it changes."""
    return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths])


def _hf_weights(folder: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def _own_config(meta: dict[str, str], path: Path) -> GPTConfig:
    try:
        return GPTConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError):
        raise Gpt2LoadError(f"{path} lacks gpt2load's config metadata: convert it again") from None


def _book_config(shapes: dict[str, tuple[int, ...]], path: Path) -> GPTConfig:
    """The architecture of a book-layout state_dict, read off its shapes (heads from the matching preset)."""
    try:
        vocab, d = shapes["tok_emb.weight"]
        ctx = shapes["pos_emb.weight"][0]
    except KeyError:
        raise Gpt2LoadError(f"{path} does not hold a GPTModel state_dict (no tok_emb/pos_emb)") from None
    layers = len({k.split(".")[1] for k in shapes if k.startswith("trf_blocks.")})
    heads = {c.emb_dim: c.n_heads for c in PRESETS.values()}.get(d)
    if heads is None:
        raise Gpt2LoadError(
            f"{path}: emb_dim {d} is not a GPT-2 size, so the head count is unknown; save it with "
            "gpt2load's own form instead, which records the config"
        )
    return GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=d, n_heads=heads, n_layers=layers)


def inspect_path(path: str | Path) -> Source:
    """Recognise the model at `path` (a folder or a weights file) without reading its tensors."""
    p = Path(path)
    if not p.exists() and not Path(str(p) + ".index").exists():
        raise Gpt2LoadError(f"{p} does not exist: give a model size (124M, 355M, 774M, 1558M) or a model folder")
    if p.is_file() or Path(str(p) + ".index").exists():
        return _inspect_file(p)
    cfg_file = p / "config.json"
    if cfg_file.is_file():
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        if raw.get("model_type") == OWN_FORMAT:
            return Source("own", p / "model.safetensors", GPTConfig.from_dict(raw["config"]), p)
        weights = _hf_weights(p)
        if weights is not None:
            return Source("hf", weights, read_hf_config(cfg_file), p)
    if (p / "model.ckpt.index").is_file() or (p / "checkpoint").is_file():
        from .tfcheckpoint import resolve_prefix

        if not (p / "hparams.json").is_file():
            raise Gpt2LoadError(f"{p} has a TensorFlow checkpoint but no hparams.json: download the model again")
        return Source("openai", resolve_prefix(p), read_hparams(p / "hparams.json"), p)
    if (p / CACHE_NAME).is_file():
        return _inspect_file(p / CACHE_NAME)
    raise Gpt2LoadError(
        f"{p} holds no model gpt2load knows: expected model.ckpt.* + hparams.json (OpenAI), "
        "config.json + model.safetensors (Hugging Face), or a gpt2load export"
    )


def _inspect_file(p: Path) -> Source:
    if p.suffix == ".index" or Path(str(p) + ".index").exists():
        prefix = p.with_suffix("") if p.suffix == ".index" else p
        return Source("openai", prefix, read_hparams(prefix.parent / "hparams.json"), prefix.parent)
    if p.suffix == ".safetensors":
        header, meta = stfile.read_header(p)
        if meta.get("format") == OWN_FORMAT:
            return Source("own", p, _own_config(meta, p), p.parent)
        if "tok_emb.weight" in header:
            shapes = {k: tuple(v["shape"]) for k, v in header.items()}
            return Source("own", p, _book_config(shapes, p), p.parent)
        return Source("hf", p, read_hf_config(p.parent / "config.json"), p.parent)
    if p.suffix in (".pth", ".pt", ".bin"):
        state = _torch_load(p)
        if "tok_emb.weight" in state:
            return Source("pth", p, _book_config({k: tuple(v.shape) for k, v in state.items()}, p), p.parent)
        return Source("hf", p, read_hf_config(p.parent / "config.json"), p.parent)
    raise Gpt2LoadError(f"{p}: unknown weights file type (expected .safetensors, .pth, .bin or .index)")


def _torch_load(p: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad file
        raise Gpt2LoadError(
            f"{p} could not be read as a PyTorch state_dict ({type(e).__name__}): is it complete?"
        ) from None
    if isinstance(state, dict) and "model_state_dict" in state:  # the book's chapter-5 checkpoint
        state = state["model_state_dict"]
    if not isinstance(state, dict):
        raise Gpt2LoadError(f"{p} does not hold a state_dict")
    return state


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
        yield from convert_tensors(_check_tied_head(items, where), HF, src.cfg, where)
    else:  # own form or book .pth: already GPTModel names
        items = stfile.mmap_tensors(src.path).items() if src.kind == "own" else _torch_load(src.path).items()
        yield from _own_items(items, src.cfg, where)


def _check_tied_head(items, where: str):
    """Pass HF tensors through; a stored lm_head must equal wte, since GPTModel ties them."""
    wte = None
    for name, t in items:
        if name == "wte.weight":
            wte = t
        elif name == "lm_head.weight" and wte is not None and not torch.equal(t, wte):
            raise Gpt2LoadError(
                f"{where} has an lm_head.weight different from wte.weight; GPT-2 ties them and "
                "gpt2load does not load untied heads"
            )
        yield name, t


def _own_items(items, cfg: GPTConfig, where: str):
    shapes = expected_shapes(cfg)
    seen = set()
    for name, t in items:
        if is_derived(name):
            continue  # tied to tok_emb / rebuilt
        if name not in shapes:
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


def write_own(path: Path, cfg: GPTConfig, tensors, extra_meta: dict[str, str] | None = None, progress=None) -> None:
    """Write GPTModel tensors as gpt2load's own safetensors file (float32, tied head stored once)."""
    specs = {k: (s, torch.float32) for k, s in expected_shapes(cfg).items()}
    meta = {"format": OWN_FORMAT, "config": json.dumps(cfg.to_dict()), **(extra_meta or {})}
    stfile.write_streaming(path, specs, tensors, meta, progress)


def cached_source(src: Source, quiet: bool = True) -> Source:
    """For OpenAI/HF sources: the converted cache beside them, made on first use; else src itself."""
    if src.kind not in ("openai", "hf"):
        return src
    cache = src.folder / CACHE_NAME
    stamp = fingerprint(src.inputs())
    if cache.is_file():
        try:
            _, meta = stfile.read_header(cache)
            if meta.get("source") == stamp and meta.get("format") == OWN_FORMAT:
                return Source("own", cache, _own_config(meta, cache), src.folder)
        except Gpt2LoadError:
            pass  # a damaged cache is simply rebuilt
    if not os.access(src.folder, os.W_OK):
        return src  # read-only folder: convert in memory on every load
    bar = _progress_bar(src.cfg.n_params * 4, f"converting {src.folder.name}", quiet)
    try:
        write_own(
            cache, src.cfg, source_tensors(src), {"source": stamp, "source_kind": src.kind}, bar.update if bar else None
        )
    except OSError as e:  # disk full, quota, read-only mount: the cache is an optimisation, the load goes on
        warnings.warn(
            f"could not cache the conversion in {cache} ({e.strerror or e}); converting in memory", stacklevel=2
        )
        return src
    finally:
        if bar:
            bar.close()
    return Source("own", cache, src.cfg, src.folder)


def _progress_bar(total: int, desc: str, quiet: bool):
    import sys

    if quiet or not sys.stderr.isatty() or total < 200_000_000:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def model_folder(
    model: str | Path, source: str = "hf", weights_dir: str | Path | None = None, quiet: bool = False
) -> Path:
    """The local folder (or file) for `model`: an existing path as is, else a size downloaded on first use."""
    if isinstance(model, Path) or os.path.exists(model) or os.path.exists(str(model) + ".index"):
        return Path(model)
    if source not in ("hf", "openai"):
        raise Gpt2LoadError(f"unknown source {source!r}: use hf or openai")
    size = resolve_size(str(model))
    from .download import download

    return download(size, source, weights_dir, quiet=quiet)


def load_gpt2(
    model: str | Path = "124M",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quiet: bool = False,
) -> GPTModel:
    """Load GPT-2 weights into a GPTModel (eval mode), downloading and converting on first use.

    Args:
        model: a size or alias (124M, 355M, 774M, 1558M, gpt2, gpt2-medium, ...) or a local folder/file in
            OpenAI, Hugging Face, gpt2load or book-.pth form.
        source: where to download sizes from: "hf" (default) or "openai".
        weights_dir: the download folder (default $GPT2LOAD_WEIGHTS_DIR or ./weights).
        device: cpu, cuda, mps; default the first available of cuda, mps, cpu.
        dtype: float32 (default), bfloat16 or float16.
        quiet: no progress bars.
    """
    src = cached_source(inspect_path(model_folder(model, source, weights_dir, quiet)), quiet)
    return _with_adapters(model_from_tensors(src.cfg, source_tensors(src), device=device, dtype=dtype), src)


def _with_adapters(model: GPTModel, src: Source) -> GPTModel:
    """A model saved with unmerged LoRA adapters (fine-tuning's --no-merge) comes back with them on."""
    if src.kind != "own" or src.path.suffix != ".safetensors":
        return model
    name = stfile.read_header(src.path)[1].get(ADAPTERS_KEY)
    if name is None:
        return model
    path = src.path.parent / name
    if not path.is_file():
        raise Gpt2LoadError(
            f"{src.path} was saved with its LoRA adapters in {path}, which is missing: put it back or fine-tune again"
        )
    return load_adapters(model, path)


def load_tokenizer(model: str | Path = "124M", source: str = "hf", weights_dir: str | Path | None = None):
    """The GPT-2 tokenizer (a tiktoken Encoding) from the files that come with `model`'s weights."""
    from .tokenizer import tokenizer_from_folder

    where = model_folder(model, source, weights_dir, quiet=True)
    return tokenizer_from_folder(where if where.is_dir() else where.parent)


def model_metadata(model: str | Path, source: str = "hf", weights_dir: str | Path | None = None) -> dict[str, str]:
    """The header metadata of a model saved in gpt2load's own form ({} for other forms): where fine-tuning
    records what using the model needs (`classifier`, `prompt_template`)."""
    src = inspect_path(model_folder(model, source, weights_dir, quiet=True))
    if src.kind != "own" or src.path.suffix != ".safetensors":
        return {}
    return stfile.read_header(src.path)[1]
