"""Turn a name, folder or file into a GPTModel (downloading a size on first use), and its tokenizer."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from .errors import Gpt2LoadError
from .fast.backend import accelerate
from .fast.int8mm import aligned_int8
from .fast.kernelstore import machine_store
from .fast.registry import Kernels, shared_kernels
from .formats import stfile
from .formats.cache import cached_source
from .formats.ggufread import gguf_tokenizer, is_gguf
from .formats.layouts import MODEL_MARKERS, WEIGHT_SUFFIXES, OwnSource, open_source
from .formats.names import expected_shapes
from .formats.ownform import head_shapes
from .hub.fetch import download, hf_repo
from .hub.sources import is_repo_id
from .model.build import empty_model, model_from_tensors, pick_device, pick_dtype
from .model.config import GPTConfig, resolve_size
from .model.gpt import GPTModel
from .model.lora import load_adapters
from .model.quant import Int8Embedding, check_quantize, quantize_model, quantized_names
from .settings import Settings
from .tokenizer import find_tokenizer_files, tokenizer_from_folder


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
    folder, whose `gpt2/` holds only size subfolders, still means the model named gpt2. A Hugging Face repo id
    (`owner/name`) is downloaded unless a file, or a folder holding a model, has that path.
    """
    if isinstance(model, Path):
        return model, None
    model = str(model)
    if written_as_path(model):
        here = Path(model).expanduser()
        if is_repo_id(model) and not model.lower().endswith(WEIGHT_SUFFIXES):
            if not (here.is_file() or Path(model + ".index").exists() or _is_model_folder(here)):
                return None, hf_repo(model)[0]
        return here, None
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
    model: str | Path,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    quiet: bool = False,
    settings: Settings | None = None,
) -> Path:
    """The local folder (or file) for `model`: a path as is, else a size downloaded on first use."""
    path, size = locate(model)
    if path is not None:
        return path
    if source not in ("hf", "openai"):
        raise Gpt2LoadError(f"unknown source {source!r}: use hf or openai")

    return download(size, source, weights_dir, quiet=quiet, settings=settings)


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
    quantize: str | None = None,
    kernels: Kernels | None = None,
    settings: Settings | None = None,
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
        quantize: "int8" for int8 weight-only Linear layers and head (see gpt2load.model.quant); a file saved
            quantized loads quantized whatever this says.
        kernels: the speed layer's `Kernels` the model computes with at inference (gpt2load.fast); default the
            process's shared one for the settings' kernel choices, with the machine's store of measured choices.
        settings: gpt2load's settings; default read from the environment now (`Settings.from_env()`).

    The output head is what the files hold: tied to tok_emb as in GPT-2, untied when a stored head differs
    from the embedding (the book's load_weights_into_gpt and its fine-tuning), or a classifier head.
    """
    settings = settings or Settings.from_env()  # a bad variable fails here, naming it
    kernels = kernels or shared_kernels(settings.kernels, machine_store(settings))
    rate = 0.0 if dropout is None else dropout
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise Gpt2LoadError(f"dropout must be a number in [0, 1), got {dropout!r}")
    check_quantize(quantize)
    src = open_source(model_folder(model, source, weights_dir, quiet, settings), n_heads)
    src = cached_source(src, quiet, cache, settings)  # OpenAI/HF: gpt2load's own file of the conversion
    cfg = replace(src.cfg, drop_rate=float(rate))
    stored = src.quantization()
    if stored is not None:  # saved quantized (only gpt2load's own form is): loaded as it is, its floats are gone
        return accelerate(quantized_from_source(src, cfg, stored, device, dtype), kernels)
    built = model_from_tensors(cfg, src.tensors(), device=device, dtype=dtype, tied=src.tied())
    adapters = src.adapters()
    if adapters is not None:  # saved with unmerged LoRA adapters (fine-tuning's --no-merge): they come back on
        built = load_adapters(built, adapters)
    return accelerate(quantize_model(built, quantize) if quantize else built, kernels)


def quantized_layout(src: OwnSource, kind: str) -> tuple[dict, dict[str, tuple]]:
    """(head metadata, {name: (shape, dtype)} in model order) of gpt2load's int8 file, every tensor checked."""
    header, head, path, cfg = src.header(), src.head() or {}, src.path, src.cfg
    shapes = {**expected_shapes(cfg), **head_shapes(cfg, head)}
    embedding = "tok_emb.weight" not in header  # 0.x files kept a float embedding beside an int8 head
    want = quantized_names(shapes, shapes, embedding)
    for name, (shape, dt) in want.items():
        got = header.get(name)
        if got is None or tuple(got["shape"]) != tuple(shape) or got["dtype"] != stfile.ST_NAMES[dt]:
            found = "is missing" if got is None else f"is {got['dtype']} {got['shape']}"
            raise Gpt2LoadError(
                f"tensor {name!r} in {path} {found}, an {kind} file of this config needs {stfile.ST_NAMES[dt]} "
                f"{list(shape)}: save it again"
            )
    extra = sorted(set(header) - set(want))
    if extra:
        raise Gpt2LoadError(f"tensor {extra[0]!r} in {path} is not part of an {kind} GPTModel: save it again")
    return head, want


def quantized_from_source(
    src: OwnSource, cfg: GPTConfig, kind: str, device: str | torch.device | None, dtype: str | torch.dtype | None
) -> GPTModel:
    """A quantized GPTModel (of `cfg`, src's config with the caller's drop rate) from gpt2load's own int8 file,
    every tensor's name, shape and dtype checked first."""
    head, want = quantized_layout(src, kind)
    embedding = "tok_emb.weight" not in want  # 0.x files kept a float embedding beside an int8 head
    dev, dt = pick_device(device), pick_dtype(dtype)
    model = empty_model(cfg)
    if head and not head.get("tied", True):  # the shell gets the recorded head (a classifier's shape, a bias)
        model._fit_head(tuple(head.get("shape", (cfg.vocab_size, cfg.emb_dim))), bool(head.get("bias")))
        model.untie_head()
    model = quantize_model(model, kind, embedding)
    state = {
        k: v.to(dev, dt if v.is_floating_point() and not k.endswith(".weight_scale") else v.dtype)
        for k, v in src.stored().items()
    }
    state = {k: aligned_int8(v) if k.endswith(".qweight") and v.device.type == "cpu" else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if isinstance(model.tok_emb, Int8Embedding):
        model.tok_emb.output_like(model.pos_emb.weight)
    return model.eval()


def load_tokenizer(model: str | Path = "124M", source: str = "hf", weights_dir: str | Path | None = None):
    """The GPT-2 tokenizer (a tiktoken Encoding) from the files that come with `model`'s weights."""

    where = model_folder(model, source, weights_dir, quiet=True)
    folder = where if where.is_dir() else where.parent
    if where.is_file() and find_tokenizer_files(folder) is None and is_gguf(where):
        return gguf_tokenizer(where)  # a GGUF file carries its tokenizer in its metadata
    return tokenizer_from_folder(folder)


def model_metadata(
    model: str | Path,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    *,
    n_heads: int | None = None,
) -> dict[str, str]:
    """The header metadata of a model saved in gpt2load's own form ({} for other forms): where fine-tuning
    records what using the model needs (`classifier`, `prompt_template`). `n_heads` as for load_gpt2."""
    return open_source(model_folder(model, source, weights_dir, quiet=True), n_heads).metadata()
