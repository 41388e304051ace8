"""An independent oracle: the book's chapter-4 GPTModel, written here from its published architecture.

Same parameter names and layout as the book (a dense float `mask` buffer per attention layer, an untied
`out_head`, explicit softmax attention, the tanh GELU written out), none of gpt2load's code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The book's chapter-5 from-scratch configuration.
BOOK_TINY = {
    "vocab_size": 96,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


class BookAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, n, _ = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.W_query(x)), heads(self.W_key(x)), heads(self.W_value(x))
        scores = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:n, :n], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.head_dim**0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, n, self.d_out))


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


class BookFeedForward(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 4 * d), BookGELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.layers(x)


class BookBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["emb_dim"]
        self.att = BookAttention(d, d, cfg["context_length"], cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"])
        self.ff = BookFeedForward(d)
        self.norm1, self.norm2 = BookLayerNorm(d), BookLayerNorm(d)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class BookGPT(nn.Module):
    """`logits = model(idx)`, nothing else: the signature gpt2load's generate accepts from any model."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        n = in_idx.shape[1]
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(torch.arange(n, device=in_idx.device)))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def book_model(seed: int = 0, **overrides) -> BookGPT:
    """A BookGPT with random weights (nonzero biases, non-unit norms), in eval mode."""
    torch.manual_seed(seed)
    model = BookGPT({**BOOK_TINY, **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "shift", "scale")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def book_loop(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None):
    """The book's chapter-5 generate loop (no cache, the whole window every step)."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1]
        if top_k is not None:
            kth = torch.topk(logits, top_k).values[:, -1:]
            logits = torch.where(logits < kth, torch.tensor(-torch.inf), logits)
        if temperature > 0.0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, nxt), dim=1)
    return idx
