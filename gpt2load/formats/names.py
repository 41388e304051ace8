"""Name maps from OpenAI's and Hugging Face's GPT-2 layouts to GPTModel, as data, and their inverse.

A map is {source pattern: Rule}; "{}" stands for the block number. A Rule names one target (or several, when
the source is the fused q/k/v projection, split in equal parts along the output dimension) and how the tensor
is laid out: OpenAI and Hugging Face store projections as Conv1D weights [in, out] (OpenAI with a leading
1), while nn.Linear wants [out, in].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import Gpt2LoadError
from ..model.config import GPTConfig

COPY, CONV1D, CONV1D_3D = "copy", "conv1d", "conv1d_3d"


@dataclass(frozen=True)
class Rule:
    targets: tuple[str, ...]
    layout: str = COPY  # COPY: as is; CONV1D: [in, out] -> transposed; CONV1D_3D: [1, in, out] -> transposed


def _qkv(part: str, layout: str) -> Rule:
    return Rule(tuple(f"trf_blocks.{{}}.att.W_{n}.{part}" for n in ("query", "key", "value")), layout)


def _one(target: str, layout: str = COPY) -> Rule:
    return Rule((target,), layout)


OPENAI_MAP: dict[str, Rule] = {
    "model/wte": _one("tok_emb.weight"),
    "model/wpe": _one("pos_emb.weight"),
    "model/h{}/ln_1/g": _one("trf_blocks.{}.norm1.scale"),
    "model/h{}/ln_1/b": _one("trf_blocks.{}.norm1.shift"),
    "model/h{}/attn/c_attn/w": _qkv("weight", CONV1D_3D),
    "model/h{}/attn/c_attn/b": _qkv("bias", COPY),
    "model/h{}/attn/c_proj/w": _one("trf_blocks.{}.att.out_proj.weight", CONV1D_3D),
    "model/h{}/attn/c_proj/b": _one("trf_blocks.{}.att.out_proj.bias"),
    "model/h{}/ln_2/g": _one("trf_blocks.{}.norm2.scale"),
    "model/h{}/ln_2/b": _one("trf_blocks.{}.norm2.shift"),
    "model/h{}/mlp/c_fc/w": _one("trf_blocks.{}.ff.layers.0.weight", CONV1D_3D),
    "model/h{}/mlp/c_fc/b": _one("trf_blocks.{}.ff.layers.0.bias"),
    "model/h{}/mlp/c_proj/w": _one("trf_blocks.{}.ff.layers.2.weight", CONV1D_3D),
    "model/h{}/mlp/c_proj/b": _one("trf_blocks.{}.ff.layers.2.bias"),
    "model/ln_f/g": _one("final_norm.scale"),
    "model/ln_f/b": _one("final_norm.shift"),
}
OPENAI_IGNORED: tuple[str, ...] = ()

HF_MAP: dict[str, Rule] = {
    "wte.weight": _one("tok_emb.weight"),
    "wpe.weight": _one("pos_emb.weight"),
    "h.{}.ln_1.weight": _one("trf_blocks.{}.norm1.scale"),
    "h.{}.ln_1.bias": _one("trf_blocks.{}.norm1.shift"),
    "h.{}.attn.c_attn.weight": _qkv("weight", CONV1D),
    "h.{}.attn.c_attn.bias": _qkv("bias", COPY),
    "h.{}.attn.c_proj.weight": _one("trf_blocks.{}.att.out_proj.weight", CONV1D),
    "h.{}.attn.c_proj.bias": _one("trf_blocks.{}.att.out_proj.bias"),
    "h.{}.ln_2.weight": _one("trf_blocks.{}.norm2.scale"),
    "h.{}.ln_2.bias": _one("trf_blocks.{}.norm2.shift"),
    "h.{}.mlp.c_fc.weight": _one("trf_blocks.{}.ff.layers.0.weight", CONV1D),
    "h.{}.mlp.c_fc.bias": _one("trf_blocks.{}.ff.layers.0.bias"),
    "h.{}.mlp.c_proj.weight": _one("trf_blocks.{}.ff.layers.2.weight", CONV1D),
    "h.{}.mlp.c_proj.bias": _one("trf_blocks.{}.ff.layers.2.bias"),
    "ln_f.weight": _one("final_norm.scale"),
    "ln_f.bias": _one("final_norm.shift"),
}
# Buffers transformers stores (older versions), and the head, which GPT-2 ties to wte (checked, not loaded).
HF_IGNORED: tuple[str, ...] = ("h.{}.attn.bias", "h.{}.attn.masked_bias", "lm_head.weight")
HF_PREFIX = "transformer."


def _regex(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


class NameMap:
    """A compiled name map: matches source names, converts tensors both ways."""

    def __init__(self, rules: dict[str, Rule], ignored: Iterable[str] = (), label: str = "") -> None:
        self.rules = rules
        self.label = label
        self._compiled = [(_regex(p), p, r) for p, r in rules.items()]
        self._ignored = [_regex(p) for p in ignored]

    def match(self, name: str) -> tuple[Rule, list[str]] | None:
        """(rule, target names) for a source name, or None when the name is not in the map."""
        for rx, _, rule in self._compiled:
            m = rx.match(name)
            if m:
                return rule, [t.replace("{}", m.group(1)) if m.groups() else t for t in rule.targets]
        return None

    def ignored(self, name: str) -> bool:
        return any(rx.match(name) for rx in self._ignored)

    def inverse(self, cfg: GPTConfig) -> Iterator[tuple[str, Rule, list[str]]]:
        """(source name, rule, target names) for every source tensor of a model of this config."""
        for pattern, rule in self.rules.items():
            blocks = [str(i) for i in range(cfg.n_layers)] if "{}" in pattern else [""]
            for i in blocks:
                yield pattern.replace("{}", i), rule, [t.replace("{}", i) for t in rule.targets]


OPENAI = NameMap(OPENAI_MAP, OPENAI_IGNORED, "OpenAI")
HF = NameMap(HF_MAP, HF_IGNORED, "Hugging Face")


def to_model_layout(t: torch.Tensor, rule: Rule) -> list[torch.Tensor]:
    """A source tensor in GPTModel's layout, split into one tensor per target."""
    if rule.layout == CONV1D_3D:
        if t.dim() != 3 or t.shape[0] != 1:
            raise ValueError(f"expected shape [1, in, out], got {list(t.shape)}")
        t = t[0]
    if rule.layout in (CONV1D, CONV1D_3D):
        if t.dim() != 2:
            raise ValueError(f"expected a 2-D Conv1D weight, got shape {list(t.shape)}")
        t = t.t()
    if len(rule.targets) == 1:
        return [t.contiguous()]
    if t.shape[0] % len(rule.targets):
        raise ValueError(f"dimension {t.shape[0]} does not split into {len(rule.targets)} equal parts")
    return [p.contiguous() for p in t.chunk(len(rule.targets), dim=0)]


def from_model_layout(parts: list[torch.Tensor], rule: Rule) -> torch.Tensor:
    """The inverse of to_model_layout: GPTModel tensors back to one source tensor."""
    t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    if rule.layout in (CONV1D, CONV1D_3D):
        t = t.t()
    if rule.layout == CONV1D_3D:
        t = t.unsqueeze(0)
    return t.contiguous()


def expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every GPTModel parameter that a checkpoint must fill (the tied head and masks excluded)."""
    d, v, c = cfg.emb_dim, cfg.vocab_size, cfg.context_length
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb.weight": (v, d),
        "pos_emb.weight": (c, d),
        "final_norm.scale": (d,),
        "final_norm.shift": (d,),
    }
    per_block = {
        "norm1.scale": (d,),
        "norm1.shift": (d,),
        "norm2.scale": (d,),
        "norm2.shift": (d,),
        "att.out_proj.weight": (d, d),
        "att.out_proj.bias": (d,),
        "ff.layers.0.weight": (4 * d, d),
        "ff.layers.0.bias": (4 * d,),
        "ff.layers.2.weight": (d, 4 * d),
        "ff.layers.2.bias": (d,),
    }
    # Query, key and value weights side by side (then their biases), so a file written in this order holds
    # each layer's fused [3d, d] q/k/v matrix in one piece, which decoding then uses without a copy.
    per_block.update({f"att.W_{n}.weight": (d, d) for n in ("query", "key", "value")})
    if cfg.qkv_bias:  # the book's from-scratch configs have none
        per_block.update({f"att.W_{n}.bias": (d,) for n in ("query", "key", "value")})
    for i in range(cfg.n_layers):
        shapes.update({f"trf_blocks.{i}.{k}": s for k, s in per_block.items()})
    return shapes


def convert_tensors(
    items: Iterable[tuple[str, torch.Tensor]], name_map: NameMap, cfg: GPTConfig, where: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (GPTModel name, tensor) from (source name, tensor), checking names, coverage and shapes.

    Args:
        items: source tensors, read lazily one at a time.
        name_map: OPENAI or HF.
        cfg: the architecture the result must fit.
        where: the file the tensors come from, for error messages.
    """
    shapes = expected_shapes(cfg)
    filled: set[str] = set()
    for name, tensor in items:
        hit = name_map.match(name)
        if hit is None:
            if name_map.ignored(name):
                continue
            raise Gpt2LoadError(
                f"tensor {name!r} in {where} is not part of the {name_map.label} GPT-2 layout: "
                "is this a GPT-2 checkpoint?"
            )
        rule, targets = hit
        try:
            parts = to_model_layout(tensor, rule)
        except ValueError as e:
            raise Gpt2LoadError(f"tensor {name!r} in {where} has the wrong shape: {e}") from None
        for target, part in zip(targets, parts, strict=True):
            want = shapes.get(target)
            if want is None:
                raise Gpt2LoadError(
                    f"tensor {name!r} in {where} belongs to a block the config does not have "
                    f"({cfg.n_layers} layers): the config and weights disagree"
                )
            if tuple(part.shape) != want:
                raise Gpt2LoadError(
                    f"tensor {name!r} in {where} gives {target} shape {list(part.shape)}, the "
                    f"config wants {list(want)}: the config and weights disagree"
                )
            if target in filled:
                raise Gpt2LoadError(f"{where} holds {target} twice (again as {name!r})")
            filled.add(target)
            yield target, part
    missing = [k for k in shapes if k not in filled]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise Gpt2LoadError(
            f"{where} lacks tensors for {', '.join(missing[:3])}{more}: the checkpoint is incomplete; download it again"
        )


def strip_hf_prefix(name: str) -> str:
    return name.removeprefix(HF_PREFIX)


def to_source_layout(state: dict[str, torch.Tensor], name_map: NameMap, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPTModel tensors back in a source layout (the export path), built from the same table."""
    return {src: from_model_layout([state[t] for t in targets], rule) for src, rule, targets in name_map.inverse(cfg)}
