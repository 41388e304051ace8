"""What gpt2load knows about a model size or a local model, without loading its weights."""

from __future__ import annotations

import os
from pathlib import Path

from .config import GPTConfig, resolve_size


def info(model: str, source: str = "hf", weights_dir: str | Path | None = None) -> dict:
    """Architecture, parameter count and where the files are (or would go)."""
    if os.path.exists(model) or os.path.exists(str(model) + ".index"):
        from .load import inspect_path

        src = inspect_path(model)
        cfg, where, layout = src.cfg, str(src.path), src.kind
        name = Path(model).name
    else:
        name = resolve_size(model)
        cfg = GPTConfig.from_name(name)
        from .hub import model_dir

        folder = model_dir(name, source, weights_dir)
        where = str(folder) if folder.is_dir() else f"{folder} (not downloaded)"
        layout = source
    return {
        "model": name,
        "layout": layout,
        "path": where,
        "parameters": f"{cfg.n_params:,}",
        "float32_bytes": f"{4 * cfg.n_params:,}",
        **cfg.to_dict(),
    }
