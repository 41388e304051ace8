"""What gpt2load knows about a model size or a local model, without loading its weights."""

from __future__ import annotations

from pathlib import Path

from .errors import Gpt2LoadError
from .formats.ggufread import gguf_tokenizer, is_gguf
from .formats.layouts import Source, open_source
from .hub.fetch import model_dir
from .load import locate
from .model.build import dtype_name
from .model.config import PRESETS, GPTConfig
from .model.lora import read_adapters
from .tokenizer import find_tokenizer_files, id_marker, tokenizer_from_folder


def _tokenizer_vocab(folder: Path, model_vocab: int, model_file: Path | None = None) -> dict:
    """The tokenizer's vocabulary size beside the model's, and what happens to ids only the model has. A GGUF
    `model_file` without tokenizer files beside it has its own, as load_tokenizer reads it."""
    has_files = folder.is_dir() and find_tokenizer_files(folder) is not None
    if not has_files and model_file is not None and model_file.is_file() and is_gguf(model_file):
        try:
            n = gguf_tokenizer(model_file).n_vocab
        except Gpt2LoadError as e:
            return {"tokenizer_vocab_size": f"no usable tokenizer ({e})"}
    elif not has_files:
        return {"tokenizer_vocab_size": "no tokenizer files"}
    else:
        n = tokenizer_from_folder(folder).n_vocab
    out: dict = {"tokenizer_vocab_size": n}
    if model_vocab > n:  # e.g. nanoGPT's 50304 rows, padded for speed: the extra ids have no text
        out["vocab_note"] = (
            f"model ids {n}..{model_vocab - 1} have no token; they decode as {id_marker(n)}-style markers"
        )
    elif model_vocab < n:
        out["vocab_note"] = f"tokenizer ids {model_vocab}..{n - 1} are outside the model"
    return out


def _stored(src: Source) -> dict:
    """How the weights are stored: their dtype (int8 with float32 scales for a quantized file), and the LoRA
    adapters loading puts on (a model saved unmerged)."""
    kind = src.quantization()
    if kind is not None:
        return {"dtype": f"{kind} (per-row float32 scales; LayerNorms, biases, positions float32)"}
    out = {"dtype": dtype_name(src.dtype())}
    if src.kind == "nanogpt":  # the training state nanoGPT records beside the weights (iter_num, config)
        out.update(src.metadata())
    path = src.adapters()
    if path is not None:
        rank, alpha, targets, _ = read_adapters(path)
        out["lora_adapters"] = f"{path.name}: rank {rank}, alpha {alpha:g}, {len(targets)} modules"
    return out


def info(model: str, source: str = "hf", weights_dir: str | Path | None = None, *, n_heads: int | None = None) -> dict:
    """Architecture, parameter count, stored dtype, tokenizer size and where the files are (or would go).
    `n_heads` as for load_gpt2 (a book-layout .pth of a width no GPT-2 size has)."""
    path, size = locate(model)
    stored: dict = {}
    model_file = None
    if size is not None and size not in PRESETS:  # a repo id: its architecture is in its downloaded config.json
        path = model_dir(size, "hf", weights_dir)
        if not path.is_dir():
            raise Gpt2LoadError(f"{size} is not downloaded: run `gpt2load download {size}` first")
    if path is not None:
        src = open_source(path, n_heads)
        cfg, where, layout, name = src.cfg, str(src.path), src.kind, path.name
        folder, model_file = (path, None) if path.is_dir() else (path.parent, path)
        stored = _stored(src)
    else:
        name, cfg, layout = size, GPTConfig.from_name(size), source
        folder = model_dir(size, source, weights_dir)
        where = str(folder) if folder.is_dir() else f"{folder} (not downloaded)"
    return {
        "model": name,
        "layout": layout,
        "path": where,
        "parameters": f"{cfg.n_params:,}",
        "float32_bytes": f"{4 * cfg.n_params:,}",
        **stored,
        **cfg.to_dict(),
        **_tokenizer_vocab(folder, cfg.vocab_size, model_file),
    }
