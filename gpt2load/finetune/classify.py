"""Predicting with a classifier (a GPTModel whose head has one output per class): `classify`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..load import load_gpt2, load_tokenizer, model_metadata
from .data import encode_texts, pad_rows, pool_positions


@torch.no_grad()
def class_logits(model, x: torch.Tensor, lengths: Sequence[int], pool: str) -> torch.Tensor:
    """Logits [B, classes] at each row's pooled position (see finetune_data.pool_positions)."""
    logits = model(x)
    pos = pool_positions(lengths, x.shape[1], pool).to(logits.device)
    return logits[torch.arange(x.shape[0], device=logits.device), pos].float()


@torch.no_grad()
def classify(
    model,
    tokenizer,
    texts: str | Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    pool: str = "last-real",
    max_length: int | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Class probabilities of each text: `[{"label": best, "probs": {label: p, ...}}, ...]`.

    Args:
        model: a GPTModel with a classification head (out_features = number of classes).
        tokenizer: the GPT-2 tiktoken encoding.
        texts: one text or several.
        labels: class names in index order (a fine-tuned model's folder records them; default "0", "1", ...).
        pool: "last-real" (the last token of the text) or "last" (the last position after padding every text
            to max_length, as the book's chapter 6 does; use the max_length the model was trained with).
        max_length: texts are cut to this many tokens (default the model's context length).
        batch_size: texts per forward pass.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise Gpt2LoadError("classify needs one or more non-empty texts")
    n_classes = model.out_head.out_features
    names = [str(i) for i in range(n_classes)] if labels is None else [str(x) for x in labels]
    if len(names) != n_classes:
        raise Gpt2LoadError(f"{len(names)} label names given for a head with {n_classes} outputs")
    if n_classes == model.cfg.vocab_size:
        raise Gpt2LoadError("this model's head is a language-model head, not a classifier: fine-tune one first")
    width = max_length or model.cfg.context_length
    if width > model.cfg.context_length:
        raise Gpt2LoadError(f"max_length {width} exceeds the model's context length {model.cfg.context_length}")
    ids = encode_texts(tokenizer, texts, width, "the texts")
    device = model.pos_emb.weight.device
    was_training = model.training
    model.eval()
    results = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        pad_to = width if pool == "last" else max(len(r) for r in rows)
        x = pad_rows(rows, pad_to).to(device)
        probs = torch.softmax(class_logits(model, x, [len(r) for r in rows], pool), dim=-1).cpu()
        for p in probs:
            results.append({"label": names[int(p.argmax())], "probs": dict(zip(names, p.tolist(), strict=True))})
    model.train(was_training)
    return results


def classify_texts(
    model: str | Path,
    texts: Sequence[str],
    *,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    n_heads: int | None = None,
) -> dict:
    """Load a fine-tuned classifier (its labels, pool and max_length from the file's metadata) and classify
    `texts`: `{"results": [{"label": ..., "probs": {label: p}}]}` (what `gpt2load classify` prints)."""
    raw = model_metadata(model, source, weights_dir, n_heads=n_heads).get("classifier")
    if raw is None:
        raise Gpt2LoadError(
            f"{model} is not a fine-tuned classifier (its metadata has no labels): make one with "
            "gpt2load finetune classify"
        )
    try:
        info = json.loads(raw)
        labels, pool, max_length = info["labels"], info["pool"], info["max_length"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Gpt2LoadError(f"{model}: the classifier metadata is damaged: fine-tune it again") from None
    net = load_gpt2(model, source, weights_dir, device=device, dtype=dtype, quiet=True, n_heads=n_heads)
    enc = load_tokenizer(model, source, weights_dir)
    return {"results": classify(net, enc, texts, labels, pool=pool, max_length=max_length)}


__all__ = ["classify", "classify_texts"]
