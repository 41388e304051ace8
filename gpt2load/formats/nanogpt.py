"""nanoGPT's `ckpt.pt`: a torch.save dict {"model", "optimizer", "model_args", "iter_num", "best_val_loss",
"config"}, read (recognised by its keys, whatever the suffix) and written (what nanoGPT's sample.py and
train.py's `init_from='resume'` load).

nanoGPT names its tensors as transformers does (`transformer.h.{i}.attn.c_attn.weight`, ...) but keeps
nn.Linear's [out, in] layout, so nothing is transposed; torch.compile'd models save with an `_orig_mod.`
prefix. A `bias=False` model has no biases at all (nor LayerNorm shifts): they load as zeros. Its vocabulary is
usually padded (50257 -> 50304) and the padded rows are kept.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..fsutil import atomic_output_file
from ..model.config import GPTConfig
from ..model.gpt import GPTModel
from ..model.quant import refuse_quantized
from .names import COPY, NameMap, Rule, convert_tensors, from_model_layout
from .relayout import check_finite
from .source import Source
from .weightfiles import TorchFile, largest_float

COMPILED_PREFIX = "_orig_mod."
NANOGPT_KEYS = ("model_args", "optimizer", "iter_num", "best_val_loss", "config")
ARG_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
QKV = ("query", "key", "value")


def _qkv(part: str) -> Rule:
    return Rule(tuple(f"trf_blocks.{{}}.att.W_{n}.{part}" for n in QKV), COPY)


def _one(target: str) -> Rule:
    return Rule((target,), COPY)


NANOGPT_MAP: dict[str, Rule] = {
    "transformer.wte.weight": _one("tok_emb.weight"),
    "transformer.wpe.weight": _one("pos_emb.weight"),
    "transformer.h.{}.ln_1.weight": _one("trf_blocks.{}.norm1.scale"),
    "transformer.h.{}.ln_1.bias": _one("trf_blocks.{}.norm1.shift"),
    "transformer.h.{}.attn.c_attn.weight": _qkv("weight"),
    "transformer.h.{}.attn.c_attn.bias": _qkv("bias"),
    "transformer.h.{}.attn.c_proj.weight": _one("trf_blocks.{}.att.out_proj.weight"),
    "transformer.h.{}.attn.c_proj.bias": _one("trf_blocks.{}.att.out_proj.bias"),
    "transformer.h.{}.ln_2.weight": _one("trf_blocks.{}.norm2.scale"),
    "transformer.h.{}.ln_2.bias": _one("trf_blocks.{}.norm2.shift"),
    "transformer.h.{}.mlp.c_fc.weight": _one("trf_blocks.{}.ff.layers.0.weight"),
    "transformer.h.{}.mlp.c_fc.bias": _one("trf_blocks.{}.ff.layers.0.bias"),
    "transformer.h.{}.mlp.c_proj.weight": _one("trf_blocks.{}.ff.layers.2.weight"),
    "transformer.h.{}.mlp.c_proj.bias": _one("trf_blocks.{}.ff.layers.2.bias"),
    "transformer.ln_f.weight": _one("final_norm.scale"),
    "transformer.ln_f.bias": _one("final_norm.shift"),
}
# The causal-mask buffer older nanoGPTs (without flash attention) saved, and the head: tied to wte, checked apart.
NANOGPT = NameMap(NANOGPT_MAP, ("transformer.h.{}.attn.bias", "lm_head.weight"), "nanoGPT")
BIASES = [k for k in NANOGPT_MAP if k.endswith(".bias")]  # what a bias=False model lacks


def is_nanogpt(raw: object) -> bool:
    """Whether what torch.load gave is a nanoGPT checkpoint: a dict with "model" and its training keys."""
    return isinstance(raw, dict) and "model" in raw and any(k in raw for k in NANOGPT_KEYS)


def _model_args(raw: dict, path: Path) -> tuple[GPTConfig, bool]:
    """(GPTConfig, bias) from the checkpoint's model_args, every value checked before anything is built."""
    args = raw.get("model_args")
    if not isinstance(args, dict):
        what = "no model_args" if args is None else f"model_args as a {type(args).__name__}, not a dict"
        raise Gpt2LoadError(f"{path} is a nanoGPT checkpoint with {what}: save it again with nanoGPT's train.py")
    missing = [k for k in ARG_KEYS if k not in args]
    if missing:
        raise Gpt2LoadError(f"{path}: nanoGPT's model_args lack {', '.join(missing)}: the checkpoint is incomplete")
    bias = args.get("bias", True)
    if not isinstance(bias, bool):
        raise Gpt2LoadError(f"{path}: nanoGPT's model_args bias={bias!r} is not true or false: fix the checkpoint")
    try:
        cfg = GPTConfig(
            vocab_size=args["vocab_size"],
            context_length=args["block_size"],
            emb_dim=args["n_embd"],
            n_heads=args["n_head"],
            n_layers=args["n_layer"],
            qkv_bias=bias,
        )
    except Gpt2LoadError as e:
        raise Gpt2LoadError(f"{path} (nanoGPT model_args): {e}") from None
    return cfg, bias


def _state(raw: dict, path: Path) -> dict[str, torch.Tensor]:
    """The model's state_dict, torch.compile's `_orig_mod.` prefix taken off, checked to be tensors."""
    model = raw["model"]
    if not isinstance(model, dict):
        raise Gpt2LoadError(
            f"{path}: nanoGPT's 'model' entry is a {type(model).__name__}, not a state_dict: is it a nanoGPT ckpt.pt?"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise Gpt2LoadError(
                f"{path}: nanoGPT's model entry {key!r} holds a {type(value).__name__}, not a tensor: is it complete?"
            )
        name = key.removeprefix(COMPILED_PREFIX)
        if name in state:
            raise Gpt2LoadError(f"{path} holds {name} twice (with and without {COMPILED_PREFIX!r})")
        state[name] = value
    return state


def _plain(value: object) -> str:
    """A checkpoint value as text for `info` (nanoGPT saves best_val_loss as a 0-d tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(value)


class NanoGPTSource(Source):
    """nanoGPT's ckpt.pt: the model's state_dict mapped to GPTModel names (loaded once, memory-mapped), its
    architecture from model_args; the optimizer state is ignored, with one notice."""

    kind = "nanogpt"

    def __init__(self, path: Path, cfg: GPTConfig, folder: Path, raw: dict, state: dict, bias: bool) -> None:
        super().__init__(path, cfg, folder)
        self._raw, self._state, self._bias = raw, state, bias
        self._noticed = False

    @classmethod
    def from_file(cls, path: Path, file: TorchFile) -> NanoGPTSource:
        """The checkpoint `file` already loaded (see `TorchFile.raw`), its model_args and names checked."""
        raw = file.raw()
        assert isinstance(raw, dict)
        cfg, bias = _model_args(raw, path)
        state = _state(raw, path)
        has_bias = "transformer.ln_f.bias" in state
        if has_bias != bias:
            said = "true" if bias else "false"
            holds = "holds biases" if has_bias else "holds no biases"
            raise Gpt2LoadError(f"{path}: nanoGPT's model_args say bias={said} but the model {holds}: fix model_args")
        return cls(path, cfg, path.parent, raw, state, bias)

    def _notice(self) -> None:
        opt = self._raw.get("optimizer")
        moments = opt.get("state") if isinstance(opt, dict) else opt
        if moments and not self._noticed:  # gpt2load loads the weights; resuming the run is nanoGPT's business
            print(f"gpt2load: notice: {self.path}: nanoGPT's optimizer state is ignored", file=sys.stderr)
        self._noticed = True

    @property
    def _head(self) -> torch.Tensor | None:
        """A stored lm_head that differs from wte (nanoGPT ties them, so normally None)."""
        lm, wte = self._state.get("lm_head.weight"), self._state.get("transformer.wte.weight")
        if lm is None or (wte is not None and lm.shape == wte.shape and torch.equal(lm, wte)):
            return None
        if wte is None or lm.shape != wte.shape:
            raise Gpt2LoadError(f"lm_head.weight in {self.path} has shape {list(lm.shape)}, not wte's")
        return lm

    def _items(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self._state.items()
        if not self._bias:  # LayerNorm without a shift and Linears without a bias compute as zeros would
            d, dt = self.cfg.emb_dim, self.dtype()
            for pattern in BIASES:
                if "c_attn" in pattern:
                    continue  # the config has no q/k/v biases
                n = 4 * d if "c_fc" in pattern else d
                blocks = range(self.cfg.n_layers) if "{}" in pattern else [0]
                yield from ((pattern.replace("{}", str(i)), torch.zeros(n, dtype=dt)) for i in blocks)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._notice()
        yield from convert_tensors(self._items(), NANOGPT, self.cfg, str(self.path))
        head = self._head
        if head is not None:
            yield "out_head.weight", head

    def dtype(self) -> torch.dtype:
        return largest_float((t.nbytes, t.dtype) for t in self._state.values())

    def head(self) -> dict | None:
        lm = self._head
        return None if lm is None else {"tied": False, "shape": list(lm.shape), "bias": False}

    def metadata(self) -> dict[str, str]:
        """iter_num, best_val_loss and the training config as nanoGPT recorded them (what `info` shows)."""
        return {k: _plain(self._raw[k]) for k in ("iter_num", "best_val_loss", "config") if k in self._raw}


# ---------------------------------------------------------------- the writer


def _all_zero(model: GPTModel, names: Sequence[str]) -> bool:
    state = model.state_dict()
    return all(not bool(state[n].any()) for n in names)


def _nanogpt_tensors(model: GPTModel, dtype: torch.dtype, bias: bool) -> dict[str, torch.Tensor]:
    """The model's tensors in nanoGPT's names (on the CPU in `dtype`; q/k/v fused, the one copy made), with
    lm_head.weight the same tensor as wte (torch.save writes it once, as nanoGPT's tie does)."""
    cfg, state = model.cfg, model.state_dict()

    def get(name: str) -> torch.Tensor:
        if name in state:
            return state[name].detach().to("cpu", dtype)
        return torch.zeros(cfg.emb_dim, dtype=dtype)  # q/k/v biases of a model without them

    out = {}
    for src, rule, targets in NANOGPT.inverse(cfg):
        if src.endswith(".bias") and not bias:
            continue
        out[src] = from_model_layout([get(t) for t in targets], rule)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _optimizer_state(cfg: GPTConfig, bias: bool) -> dict:
    """An AdamW state_dict with no moments, grouped as nanoGPT's configure_optimizers groups (matrices
    decayed, vectors not), so that train.py's `optimizer.load_state_dict` accepts it when resuming."""
    matrices = 2 + 4 * cfg.n_layers  # wte (lm_head is the same parameter), wpe; c_attn, c_proj, c_fc, c_proj
    # per block ln_1 and ln_2 (weight, bias) and the four Linears' biases, then ln_f; without bias, weights only
    vectors = (8 * cfg.n_layers + 2) if bias else (2 * cfg.n_layers + 1)
    common = {"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "amsgrad": False, "maximize": False}
    return {
        "state": {},
        "param_groups": [
            {**common, "weight_decay": 0.1, "params": list(range(matrices))},
            {**common, "weight_decay": 0.0, "params": list(range(matrices, matrices + vectors))},
        ],
    }


def export_nanogpt(
    model: GPTModel,
    out: str | Path,
    dtype: torch.dtype,
    *,
    force: bool = False,
    protect: Sequence[Path] = (),
    strict: bool = False,
) -> Path:
    """A nanoGPT `ckpt.pt` at `out`: model_args, the state_dict in nanoGPT's names, iter_num 0, best_val_loss
    1e9 (nanoGPT's starting value), a config and an AdamW state without moments. `bias` is false when the model
    has no q/k/v biases and every other bias and LayerNorm shift is zero (nanoGPT's bias=False), else true
    (missing q/k/v biases written as zeros). A head other than the tied embedding is refused: nanoGPT ties it.

    Memory: the model plus its q/k/v weights once more (fused per layer), or a whole copy when `dtype` differs
    from the model's (torch.save wants every tensor at once)."""
    refuse_quantized(model, "nanoGPT's checkpoint cannot hold", "export with dequantize=True (--dequantize)")
    out, cfg, head = Path(out), model.cfg, model.head_meta()
    if not head["tied"]:
        raise Gpt2LoadError(
            f"the model's head ({head['shape']}) is not tied to its token embedding, and nanoGPT always ties them: "
            "export with --to safetensors or --to hf instead"
        )
    others = [k for k, _ in model.state_dict().items() if k.endswith((".bias", ".shift")) and ".att.W_" not in k]
    bias = cfg.qkv_bias or not _all_zero(model, others)
    args = {
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_embd": cfg.emb_dim,
        "block_size": cfg.context_length,
        "bias": bias,
        "vocab_size": cfg.vocab_size,
        "dropout": 0.0,
    }
    tensors = _nanogpt_tensors(model, dtype, bias)
    check_finite(((k, v, dtype) for k, v in tensors.items() if k != "lm_head.weight"), out, strict)
    ckpt = {
        "model": tensors,
        "optimizer": _optimizer_state(cfg, bias),
        "model_args": args,
        "iter_num": 0,
        "best_val_loss": 1e9,
        "config": {**args, "init_from": "resume", "written_by": "gpt2load"},
    }
    with atomic_output_file(out, "nanogpt", force=force, protect=protect) as tmp:
        torch.save(ckpt, tmp)
    return out
