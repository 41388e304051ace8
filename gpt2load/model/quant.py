"""int8 weight-only quantization: every nn.Linear (and the output head) becomes an `Int8Linear`, the token
embedding an `Int8Embedding`.

Each output channel (row of the [out, in] weight) gets its own scale, max |w| / 127, and its weights are rounded
to int8 (symmetric, no zero point). Activations stay in the model's dtype (float32 or bfloat16); the position
embedding, LayerNorms and biases stay as they are. The model's forward is unchanged: only modules are swapped, so
decoding reads about a quarter of the bytes per token. The head's rows are the token embedding's rows, so a tied
head and the embedding share one int8 matrix and its scales (one copy, as in the float model): the weights held
are about a quarter of float32's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Gpt2LoadError

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """A Linear with int8 weights `qweight` [out, in] and float32 per-output-channel `weight_scale` [out] (buffers, not
    parameters: nothing here trains), and an optional float `bias`. With a backend (gpt2load.fast), a measured
    int8 kernel computes it; without, the dequantized weight does (exact, slow)."""

    backend = None  # set by gpt2load.fast.accelerate

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
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta", dtype=w.dtype)
        if w.is_meta:  # a shell to load an int8 file into (meta ops would import torch's reference kernels)
            return q
        q.qweight, q.weight_scale = quantize_weight(w)  # (built on meta: no buffers to fill and throw away)
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
        if self.backend is not None:
            return self.backend.int8_linear(self, x)
        y = F.linear(x, self.qweight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None])
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An nn.Embedding with int8 rows `qweight` [num, dim] and float32 per-row `weight_scale` [num] (buffers): a
    lookup dequantizes the rows it reads, into the model's float dtype (which `.to(dtype)` changes)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shape = (num_embeddings, embedding_dim)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32, device=device))
        # not saved: only carries the output dtype through .to()/.bfloat16()
        out = torch.empty(0, dtype=dtype or torch.get_default_dtype(), device=device)
        self.register_buffer("out_dtype", out, persistent=False)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, shared: Int8Linear | None = None) -> Int8Embedding:
        """The int8 form of `emb`; with `shared` (the tied head, already quantized from these very rows), its
        int8 matrix and scales themselves."""
        w = emb.weight.detach()
        e = cls(emb.num_embeddings, emb.embedding_dim, device="meta", dtype=w.dtype)
        e.output_like(w)
        if shared is not None:
            e.qweight, e.weight_scale = shared.qweight, shared.weight_scale
        elif not w.is_meta:
            e.qweight, e.weight_scale = quantize_weight(w)
        return e

    def output_like(self, t: torch.Tensor) -> None:
        """Look up into t's dtype and device from now on (a shell filled from a file)."""
        self.out_dtype = torch.empty(0, dtype=t.dtype, device=t.device)

    def dequantized(self) -> torch.Tensor:
        """The float rows [num, dim] these int8 values stand for (float32)."""
        return self.qweight.float() * self.weight_scale.float()[:, None]

    def to_embedding(self) -> nn.Embedding:
        """An nn.Embedding holding the dequantized rows, in the output dtype (for exports)."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, device="meta")
        emb.weight = nn.Parameter(self.dequantized().to(self.out_dtype.dtype), requires_grad=False)
        return emb

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[idx].to(torch.float32) * self.weight_scale[idx].float()[..., None]
        return rows.to(self.out_dtype.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [out, in], float32 scales [out]) with w ~= q * scale[:, None]; an all-zero row gets scale 1.

    A few hundred KB of rows at a time: float temporaries the size of the matrix would stay with the process's
    allocator after quantizing, and int8 is meant to save memory."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    rows = max(1, (1 << 16) // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        part = w[start : start + rows].float()
        amax = part.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q[start : start + rows] = torch.round(part / s[:, None]).clamp_(-127, 127)
        scale[start : start + rows] = s
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


def quantize_model(model: nn.Module, quantize: str = "int8", embedding: bool = True) -> nn.Module:
    """Swap every nn.Linear of `model` (the head included) for an Int8Linear and its `tok_emb` for an
    Int8Embedding (sharing the int8 matrix of a tied head), in place. The float weights are released: the
    small float tensors left (biases, LayerNorms, the position embedding) are copied, so a model loaded from
    a memory-mapped file lets go of the file's pages. `embedding=False` keeps a float tok_emb and gives the
    head its own int8 copy (how files of gpt2load 0.x stored int8 models). Returns the model, in eval mode."""
    check_quantize(quantize)
    emb, head = getattr(model, "tok_emb", None), getattr(model, "out_head", None)
    tied = type(emb) is nn.Embedding and getattr(head, "weight", None) is emb.weight
    for parent, name, lin in _linears(model, nn.Linear):
        setattr(parent, name, Int8Linear.from_linear(lin))
    if embedding and type(emb) is nn.Embedding:
        model.tok_emb = Int8Embedding.from_embedding(emb, model.out_head if tied else None)
    backend = getattr(model, "backend", None)
    if backend is not None:  # the new modules ask the model's backend too; its fused float weights are let go
        backend.forget(model)
        for m in model.modules():
            if hasattr(type(m), "backend"):
                m.backend = backend
    _own_float_tensors(model)
    return model.eval()


def _own_float_tensors(model: nn.Module) -> None:
    """Give every float parameter and buffer its own memory (a copy), keeping tensors shared between modules
    shared: nothing is left viewing the memory-mapped file the float model came from."""
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, t in table.items():
                    if t is None or t.is_meta or not t.is_floating_point() or t.numel() == 0:
                        continue
                    if id(t) not in copies:
                        c = t.detach().clone()
                        copies[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
                    table[name] = copies[id(t)]


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every Int8Linear back for an nn.Linear of its dequantized weights and an Int8Embedding for an
    nn.Embedding, in place (exports need floats). A head that shared the embedding's int8 matrix is tied to the
    float embedding again (its values are the same)."""
    emb, head = getattr(model, "tok_emb", None), getattr(model, "out_head", None)
    tied = isinstance(emb, Int8Embedding) and getattr(head, "qweight", None) is emb.qweight
    for parent, name, q in _linears(model, Int8Linear):
        setattr(parent, name, q.to_linear())
    if isinstance(emb, Int8Embedding):
        model.tok_emb = emb.to_embedding()
        if tied:
            model.out_head.weight = model.tok_emb.weight
    return model


def quantization(model: nn.Module) -> str | None:
    """ "int8" when any module of the model is an Int8Linear or Int8Embedding, else None."""
    return "int8" if any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules()) else None


def refuse_quantized(model: nn.Module, what: str, fix: str) -> None:
    """Raise a Gpt2LoadError when `model` is quantized: `what` cannot use int8 weights; `fix` says what to do."""
    if quantization(model):
        raise Gpt2LoadError(f"the model has int8 (quantized) weights, which {what}: {fix}")


def quantized_names(
    names: Iterable[str], shapes: dict[str, tuple[int, ...]], embedding: bool = True
) -> dict[str, tuple]:
    """The tensors an int8 file holds for float tensors `names` of `shapes`: every 2-D `X.weight` but the position
    embedding (and the token embedding, with `embedding=False`: the 0.x files) becomes `X.qweight` (int8) and
    `X.weight_scale` [out] (float32); the rest stay float32."""
    keep = ("pos_emb.weight",) if embedding else ("pos_emb.weight", "tok_emb.weight")
    out: dict[str, tuple] = {}
    for name in names:
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) == 2 and name not in keep:
            stem = name[: -len(".weight")]
            out[stem + ".qweight"] = (shape, torch.int8)
            out[stem + ".weight_scale"] = ((shape[0],), torch.float32)
        else:
            out[name] = (shape, torch.float32)
    return out


__all__ = [
    "Int8Embedding",
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
