"""int8 weight-only quantization: every nn.Linear (and the output head) becomes an `Int8Linear`.

Each output channel (row of the [out, in] weight) gets its own scale, max |w| / 127, and its weights are rounded
to int8 (symmetric, no zero point). Activations stay in the model's dtype (float32 or bfloat16); embeddings and
LayerNorms stay as they are. The model's forward is unchanged: only the Linear modules are swapped, so decoding
reads about a quarter of the bytes per token. A tied head gets its own int8 copy (the embedding stays float).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import Gpt2LoadError
from .kernels import int8_linear

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """A Linear with int8 weights `qweight` [out, in] and float32 per-output-channel `weight_scale` [out] (buffers, not
    parameters: nothing here trains), and an optional float `bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.register_buffer("bias", b)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        """The int8 form of `lin`: per-row symmetric scales, round to nearest."""
        w = lin.weight.detach()
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:  # a shell to load an int8 file into (meta ops would import torch's reference kernels)
            return q
        q.qweight, q.weight_scale = quantize_weight(w)
        if lin.bias is not None:
            q.bias = lin.bias.detach().clone()
        return q

    def dequantized(self) -> torch.Tensor:
        """The float weight [out, in] these int8 values stand for (float32)."""
        return self.qweight.float() * self.weight_scale[:, None]

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An nn.Linear holding the dequantized weight (for exports)."""
        dt = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.qweight.device)
        with torch.no_grad():
            lin.weight = nn.Parameter(self.dequantized().to(dt), requires_grad=False)
            if self.bias is not None:
                lin.bias = nn.Parameter(self.bias.to(dt).clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in], float32 scales [out]) with w ~= q * scale[:, None]; an all-zero row gets scale 1."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _entropy(logits: torch.Tensor) -> float:
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean().item()


def fidelity(ref: nn.Module, model: nn.Module, idx: torch.Tensor, entropy: float | None = None) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || model) in nats) of the next-token distributions of `model` against `ref`
    on the token ids `idx` (teacher-forced: every position predicts the next).

    `entropy`: divide both models' logits by the one temperature that gives `ref` this mean entropy (nats), so
    random weights, whose logits are far more peaked or flatter than a trained model's, are compared at a
    trained model's spread (GPT-2 on English text: about 3 nats)."""
    with torch.inference_mode():
        p, q = ref(idx).float(), model(idx).float()
    if entropy is not None:
        lo, hi = 1e-3, 1e3  # the entropy grows with the temperature: bisect on a log scale
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if _entropy(p / mid) < entropy else (lo, mid)
        p, q = p / lo, q / lo
    p, q = p.log_softmax(-1), q.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return (p.argmax(-1) == q.argmax(-1)).float().mean().item(), kl


def _linears(model: nn.Module, cls: type) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every module of exactly `cls` in the model."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is cls
    ]


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise Gpt2LoadError(f"unknown quantization {quantize!r}: use {' or '.join(QUANTIZATIONS)} (or none)")


def quantize_model(model: nn.Module, quantize: str = "int8") -> nn.Module:
    """Swap every nn.Linear of `model` (the head included) for an Int8Linear, in place; the float weights are
    released (a tied head's embedding stays, as the embedding). Returns the model, in eval mode."""
    check_quantize(quantize)
    for parent, name, lin in _linears(model, nn.Linear):
        setattr(parent, name, Int8Linear.from_linear(lin))
    for block in getattr(model, "trf_blocks", ()):
        att = getattr(block, "att", None)
        for stacked in (getattr(att, "_qkv_weight", None), getattr(att, "_qkv_bias", None)):
            if stacked is not None:
                stacked.__init__()  # drop the float q/k/v alias or copy
    return model.eval()


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every Int8Linear back for an nn.Linear of its dequantized weights, in place (exports need floats).
    The head stays untied: its values are the int8 ones, not the embedding's."""
    for parent, name, q in _linears(model, Int8Linear):
        setattr(parent, name, q.to_linear())
    return model


def quantization(model: nn.Module) -> str | None:
    """ "int8" when any module of the model is an Int8Linear, else None."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else None


def refuse_quantized(model: nn.Module, what: str, fix: str) -> None:
    """Raise a Gpt2LoadError when `model` is quantized: `what` cannot use int8 weights; `fix` says what to do."""
    if quantization(model):
        raise Gpt2LoadError(f"the model has int8 (quantized) weights, which {what}: {fix}")


def quantized_names(names: Iterable[str], shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """The tensors an int8 file holds for float tensors `names` of `shapes`: every 2-D `X.weight` but the token
    and position embeddings becomes `X.qweight` (int8) and `X.weight_scale` [out] (float32); the rest stay float32."""
    out: dict[str, tuple] = {}
    for name in names:
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) == 2 and not name.endswith("_emb.weight"):
            stem = name[: -len(".weight")]
            out[stem + ".qweight"] = (shape, torch.int8)
            out[stem + ".weight_scale"] = ((shape[0],), torch.float32)
        else:
            out[name] = (shape, torch.float32)
    return out


__all__ = [
    "Int8Linear",
    "QUANTIZATIONS",
    "check_quantize",
    "dequantize_model",
    "fidelity",
    "quantization",
    "quantize_model",
    "quantize_weight",
    "quantized_names",
    "refuse_quantized",
]
