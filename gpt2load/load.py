"""Find out what a folder or file holds (OpenAI checkpoint, Hugging Face, gpt2load's own form, book .pth)
and turn it into a GPTModel, converting once into a cached safetensors file."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import stfile
from .build import dtype_name, model_from_tensors
from .config import PRESETS, GPTConfig, read_hf_config, read_hparams, read_json_object, resolve_size
from .convert import HF, OPENAI, convert_tensors, expected_shapes, strip_hf_prefix
from .env import env_flag, env_path
from .errors import Gpt2LoadError
from .lora import ADAPTERS_KEY, load_adapters
from .model import GPTModel
from .tfcheckpoint import TFCheckpoint, resolve_prefix

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
            return Source("own", p, _own_config(meta, p), p.parent)
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
) -> None:
    """Write GPTModel tensors as gpt2load's own safetensors file, each cast to `dtype` as it is written. A tied
    head is stored once (as tok_emb); any other head (`head`, as `GPTModel.head_meta()` gives it) is stored and
    recorded."""
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, head)}
    specs = {k: (s, dtype) for k, s in shapes.items()}
    meta = {"format": OWN_FORMAT, "config": json.dumps(cfg.to_dict()), "dtype": dtype_name(dtype)}
    meta.update(extra_meta or {})
    if head is not None:
        meta["head"] = json.dumps(head)
    stfile.write_streaming(path, specs, tensors, meta, progress)


def cache_dir() -> Path:
    """gpt2load's own folder for converted weights: $GPT2LOAD_CACHE_DIR, else $XDG_CACHE_HOME/gpt2load/converted,
    else ~/.cache/gpt2load/converted."""
    xdg = env_path("XDG_CACHE_HOME")
    return env_path("GPT2LOAD_CACHE_DIR") or (xdg or Path.home() / ".cache") / "gpt2load" / "converted"


def cache_file(src: Source) -> Path:
    """Where the conversion of `src` is cached: one entry per source, named by a hash of its resolved path
    (so a re-downloaded source replaces its entry instead of leaving a stale one); the file's metadata holds
    the source fingerprint, which decides whether the entry is still good."""
    key = hashlib.sha256(str(src.path.resolve()).encode()).hexdigest()[:20]
    return cache_dir() / f"{src.folder.name}-{key}" / CACHE_NAME


def cache_wanted(cache: bool | None) -> bool:
    """cache=False turns the conversion cache off, as does GPT2LOAD_NO_CACHE=1 when cache is None."""
    return cache if cache is not None else not env_flag("GPT2LOAD_NO_CACHE")


def cached_source(src: Source, quiet: bool = True, cache: bool | None = None) -> Source:
    """For OpenAI/HF sources: their conversion in gpt2load's cache folder, made on first use; else src itself.

    Nothing is ever written beside the source (a Hugging Face cache snapshot, a book download, a read-only
    mount): only into `cache_dir()`. If that cannot be written, or the cache is off, conversion runs in memory.
    """
    if src.kind not in ("openai", "hf") or not cache_wanted(cache):
        return src
    cached = cache_file(src)
    stamp = fingerprint(src.inputs())
    if cached.is_file():
        try:
            _, meta = stfile.read_header(cached)
            if meta.get("source") == stamp and meta.get("format") == OWN_FORMAT:
                return Source("own", cached, _own_config(meta, cached), src.folder)
        except Gpt2LoadError:
            pass  # a damaged cache is simply rebuilt
    bar = _progress_bar(src.cfg.n_params * 4, f"converting {src.folder.name}", quiet)
    try:
        meta = {"source": stamp, "source_kind": src.kind}
        # The cache keeps the source's dtype: a bfloat16 checkpoint loads as bfloat16 unless dtype= says otherwise.
        progress = bar.update if bar else None
        write_own(cached, src.cfg, source_tensors(src), meta, progress, hf_head_meta(src), source_dtype(src))
    except OSError as e:  # disk full, quota, read-only home: the cache is an optimisation, the load goes on
        warnings.warn(
            f"could not cache the conversion in {cached} ({e.strerror or e}); converting in memory "
            "(set GPT2LOAD_CACHE_DIR to a writable folder, or GPT2LOAD_NO_CACHE=1)",
            stacklevel=2,
        )
        return src
    finally:
        if bar:
            bar.close()
    return Source("own", cached, src.cfg, src.folder)


def _progress_bar(total: int, desc: str, quiet: bool):
    import sys

    if quiet or not sys.stderr.isatty() or total < 200_000_000:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)


def written_as_path(model: str) -> bool:
    """True when `model` is spelled as a path (./gpt2, gpt2/124M, /abs, ~/m, model.pth), not as a bare name."""
    return (
        "/" in model
        or os.sep in model
        or model.startswith((".", "~"))
        or os.path.isabs(model)
        or model.lower().endswith(WEIGHT_SUFFIXES)
    )


def _is_model_folder(p: Path) -> bool:
    return p.is_dir() and any((p / name).exists() for name in MODEL_MARKERS)


def locate(model: str | Path) -> tuple[Path | None, str | None]:
    """(local path, None) or (None, size name to download) for what the user wrote.

    A Path or anything written as a path is a path. A bare word is a model name (124M, gpt2, ...) unless a
    file of that name exists, or a folder of that name that holds a model: so `gpt2` inside the book's working
    folder, whose `gpt2/` holds only size subfolders, still means the model named gpt2.
    """
    if isinstance(model, Path):
        return model, None
    model = str(model)
    if written_as_path(model):
        return Path(model).expanduser(), None
    here = Path(model)
    exists = here.exists() or Path(model + ".index").exists()
    try:
        size = resolve_size(model)
    except Gpt2LoadError as e:
        if exists:
            return here, None
        raise Gpt2LoadError(f"{e} (there is no file or folder {model!r} here either)") from None
    if here.is_file() or Path(model + ".index").exists() or _is_model_folder(here):
        return here, None
    return None, size


def model_folder(
    model: str | Path, source: str = "hf", weights_dir: str | Path | None = None, quiet: bool = False
) -> Path:
    """The local folder (or file) for `model`: a path as is, else a size downloaded on first use."""
    path, size = locate(model)
    if path is not None:
        return path
    if source not in ("hf", "openai"):
        raise Gpt2LoadError(f"unknown source {source!r}: use hf or openai")
    from .hub import download

    return download(size, source, weights_dir, quiet=quiet)


def load_gpt2(
    model: str | Path = "124M",
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quiet: bool = False,
    cache: bool | None = None,
    *,
    dropout: float | None = None,
    n_heads: int | None = None,
) -> GPTModel:
    """Load GPT-2 weights into a GPTModel (eval mode), downloading and converting on first use.

    Args:
        model: a size or alias (124M, 355M, 774M, 1558M, gpt2, gpt2-medium, ...) or a local folder/file in
            OpenAI, Hugging Face, gpt2load or book-.pth form.
        source: where to download sizes from: "hf" (default) or "openai".
        weights_dir: the download folder (default $GPT2LOAD_WEIGHTS_DIR or ./weights).
        device: cpu, cuda, mps; default the first available of cuda, mps, cpu.
        dtype: float32, bfloat16 or float16; default the dtype the weights are stored in (float32 for
            OpenAI's and most checkpoints; a bfloat16 or float16 file stays so).
        quiet: no progress bars.
        cache: keep the conversion of an OpenAI/HF source in gpt2load's cache folder (see `cache_dir`) so later
            loads are zero-copy; None (default) means yes unless GPT2LOAD_NO_CACHE=1, False converts in memory.
        dropout: the model's drop rate (default None: 0.0, the book's choice for loaded weights in chapters
            6-7; pass 0.1 to train as the book's chapter 5 does).
        n_heads: attention heads, needed only for a book-layout .pth of a width no GPT-2 size has.

    The output head is what the files hold: tied to tok_emb as in GPT-2, untied when a stored head differs
    from the embedding (the book's load_weights_into_gpt and its fine-tuning), or a classifier head.
    """
    rate = 0.0 if dropout is None else dropout
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise Gpt2LoadError(f"dropout must be a number in [0, 1), got {dropout!r}")
    src = cached_source(inspect_path(model_folder(model, source, weights_dir, quiet), n_heads), quiet, cache)
    cfg = replace(src.cfg, drop_rate=float(rate))
    net = model_from_tensors(cfg, source_tensors(src), device=device, dtype=dtype, tied=_recorded_tie(src))
    return _with_adapters(net, src)


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


def _recorded_tie(src: Source) -> bool | None:
    """Whether gpt2load's own file recorded its head as tied (None: not recorded, the data decides)."""
    if src.kind != "own":
        return None
    head = stfile.read_header(src.path)[1].get("head")
    try:
        return bool(json.loads(head).get("tied", True)) if head else None
    except (json.JSONDecodeError, AttributeError):
        raise Gpt2LoadError(f"{src.path} has unreadable head metadata: save or convert it again") from None


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
