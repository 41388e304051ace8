"""Model hyperparameters: one dataclass, the four OpenAI presets, and readers of the files that describe them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import Gpt2LoadError


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
        if self.emb_dim % self.n_heads:
            raise Gpt2LoadError(
                f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}: fix the config file"
            )

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Gpt2LoadError(f"unknown GPTConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str) -> GPTConfig:
        """The preset for a size or alias, e.g. '124M' or 'gpt2-medium'."""
        return PRESETS[resolve_size(name)]


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Gpt2LoadError(f"{path} is missing: download the model again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Gpt2LoadError(f"{path} is not valid JSON ({e}): delete it and download again") from None


def _translate(raw: dict, keys: dict[str, str], path: Path) -> GPTConfig:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise Gpt2LoadError(f"{path} lacks {missing}: is this a GPT-2 model folder?")
    return GPTConfig(**{ours: int(raw[theirs]) for theirs, ours in keys.items()})


def read_hparams(path: str | Path) -> GPTConfig:
    """GPTConfig from OpenAI's hparams.json."""
    return _translate(_read_json(Path(path)), _HPARAMS_KEYS, Path(path))


def read_hf_config(path: str | Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json."""
    raw = _read_json(Path(path))
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
