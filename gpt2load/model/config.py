"""Model hyperparameters: one dataclass, the four OpenAI presets, and readers of the files that describe them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import Gpt2LoadError

# Sane ranges for every whole-number hyperparameter, far beyond any GPT-2 (1558M: 1600 wide, 48 deep), so a
# typo or a hostile file fails here, before a single tensor or module is allocated.
INT_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "context_length": (1, 1 << 17),
    "emb_dim": (1, 1 << 16),
    "n_heads": (1, 1 << 12),
    "n_layers": (1, 1 << 12),
}
MAX_PARAMS = 10_000_000_000  # 40 GB of float32: refused before building anything larger


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2 model, in the book's names."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        check_values(self)

    @property
    def n_params(self) -> int:
        """Number of parameters with the output head tied to the token embedding (as OpenAI stores it)."""
        d, L = self.emb_dim, self.n_layers
        per_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.context_length * d + L * per_block + 2 * d

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        if not isinstance(d, dict):
            raise Gpt2LoadError(f"a GPTConfig must be a JSON object / dict, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Gpt2LoadError(f"unknown GPTConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> GPTConfig:
        """The preset for a size or alias, e.g. '124M' or 'gpt2-medium'."""
        return PRESETS[resolve_size(name)]


def _bad(name: str, value: object, want: str) -> Gpt2LoadError:
    return Gpt2LoadError(f"config value {name}={value!r} is invalid: it must be {want}; fix the config")


def check_values(cfg: GPTConfig) -> None:
    """Type and range of every field, emb_dim % n_heads, and the parameter-count ceiling: cheap arithmetic only,
    so an absurd config is refused in microseconds, before anything is allocated."""
    for name, (lo, hi) in INT_LIMITS.items():
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int):  # bool is an int to Python, not to a config
            raise _bad(name, v, f"a whole number from {lo} to {hi:,}")
        if not lo <= v <= hi:
            raise _bad(name, v, f"from {lo} to {hi:,}")
    d = cfg.drop_rate
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 <= d < 1):
        raise _bad("drop_rate", d, "a number from 0 up to (not including) 1")
    if not isinstance(cfg.qkv_bias, bool):
        raise _bad("qkv_bias", cfg.qkv_bias, "true or false")
    if cfg.emb_dim % cfg.n_heads:
        raise Gpt2LoadError(f"emb_dim {cfg.emb_dim} is not divisible by n_heads {cfg.n_heads}: fix the config")
    if cfg.n_params > MAX_PARAMS:
        raise Gpt2LoadError(
            f"the config describes {cfg.n_params:,} parameters ({4 * cfg.n_params / 1e9:,.0f} GB of float32), "
            f"more than gpt2load's limit of {MAX_PARAMS:,}: check n_layers/emb_dim/vocab_size/context_length"
        )


PRESETS: dict[str, GPTConfig] = {
    "124M": GPTConfig(emb_dim=768, n_heads=12, n_layers=12),
    "355M": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24),
    "774M": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36),
    "1558M": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48),
}

ALIASES: dict[str, str] = {
    "gpt2": "124M",
    "gpt2-small": "124M",
    "gpt2-medium": "355M",
    "gpt2-large": "774M",
    "gpt2-xl": "1558M",
    "124m": "124M",
    "355m": "355M",
    "774m": "774M",
    "1558m": "1558M",
    "1.5b": "1558M",
}


def resolve_size(name: str) -> str:
    """Canonical size ('124M', ...) of a size name or alias; raises listing the valid names."""
    if name in PRESETS:
        return name
    key = name.lower().removeprefix("openai-community/")
    if key in ALIASES:
        return ALIASES[key]
    valid = ", ".join(list(PRESETS) + [a for a in ALIASES if not a[0].isdigit()])
    raise Gpt2LoadError(f"unknown model {name!r}: use one of {valid}, or a path to a local model folder")


# OpenAI hparams.json and Hugging Face config.json keys -> GPTConfig fields.
_HPARAMS_KEYS = {
    "n_vocab": "vocab_size",
    "n_ctx": "context_length",
    "n_embd": "emb_dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
}
_HF_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "n_positions": "context_length",
    "n_embd": "emb_dim",
    "n_head": "n_heads",
    "n_layer": "n_layers",
}


MAX_CONFIG_BYTES = 10_000_000  # a config file is a few hundred bytes; anything this big is not one


def read_json_object(path: str | Path) -> dict:
    """A small JSON file holding an object, or a Gpt2LoadError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES:,} bytes")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise Gpt2LoadError(f"{path} is missing: download the model again") from None
    except IsADirectoryError:
        raise Gpt2LoadError(f"{path} is a folder, not a JSON file") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Gpt2LoadError(f"{path} is not valid JSON ({e}): fix it, or delete it and download again") from None
    if not isinstance(data, dict):
        raise Gpt2LoadError(f"{path} holds a JSON {type(data).__name__}, not an object: fix it or download again")
    return data


def config_from(values: dict, where: object) -> GPTConfig:
    """GPTConfig(**values), with a validation failure naming `where` (the file or dict it came from)."""
    try:
        return GPTConfig(**values)
    except Gpt2LoadError as e:
        raise Gpt2LoadError(f"{where}: {e}") from None


def _translate(raw: dict, keys: dict[str, str], path: Path) -> GPTConfig:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise Gpt2LoadError(f"{path} lacks {missing}: is this a GPT-2 model folder?")
    return config_from({ours: raw[theirs] for theirs, ours in keys.items()}, path)


def read_hparams(path: str | Path) -> GPTConfig:
    """GPTConfig from OpenAI's hparams.json."""
    return _translate(read_json_object(path), _HPARAMS_KEYS, Path(path))


def read_hf_config(path: str | Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json."""
    raw = read_json_object(path)
    if raw.get("model_type", "gpt2") != "gpt2":
        raise Gpt2LoadError(f"{path} describes a {raw['model_type']!r} model; gpt2load reads only gpt2")
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise Gpt2LoadError(f"{path}: activation {raw['activation_function']!r} is not GPT-2's tanh GELU")
    return _translate(raw, _HF_CONFIG_KEYS, Path(path))


def hf_config_dict(cfg: GPTConfig) -> dict:
    """A transformers GPT2Config dict for cfg (used when exporting an HF folder)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": None,
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "bos_token_id": min(50256, cfg.vocab_size - 1),
        "eos_token_id": min(50256, cfg.vocab_size - 1),
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "use_cache": True,
    }
