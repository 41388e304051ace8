"""Predicting with a classifier (a GPTModel whose head has one output per class): `classify`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..load import load_gpt2, load_tokenizer, model_metadata
from .data import POOLS, encode_texts, notice, pad_rows, pool_positions


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
    if len(set(names)) != len(names):
        raise Gpt2LoadError(f"the label names {names} repeat a name: give each class its own")
    if n_classes == model.cfg.vocab_size:
        raise Gpt2LoadError("this model's head is a language-model head, not a classifier: fine-tune one first")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise Gpt2LoadError(f"max_length must be a whole number of tokens, at least 1, got {max_length!r}")
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


def parse_labels(text: str) -> list[str]:
    """`--labels ham,spam`: class names in index order, each non-empty and different."""
    names = [x.strip() for x in text.split(",")]
    if not all(names):
        raise Gpt2LoadError(f"--labels {text!r} has an empty name: give names separated by commas, e.g. ham,spam")
    return names


def _recorded(model: str | Path, raw: str | None) -> dict:
    """What a gpt2load fine-tuned classifier records about its use ({} for any other model)."""
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
        return {"labels": info["labels"], "pool": info["pool"], "max_length": info["max_length"]}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise Gpt2LoadError(f"{model}: the classifier metadata is damaged: fine-tune it again") from None


def classify_texts(
    model: str | Path,
    texts: Sequence[str],
    *,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    n_heads: int | None = None,
    labels: Sequence[str] | None = None,
    pool: str | None = None,
    max_length: int | None = None,
) -> dict:
    """Load a classifier and classify `texts`: `{"results": [{"label": ..., "probs": {label: p}}]}` (what
    `gpt2load classify` prints).

    Any model whose head has one output per class works: one fine-tuned by gpt2load records its labels, pool
    and max_length in its metadata; any other (the book's chapter 6 `torch.save(model.state_dict())` after
    `model.out_head = torch.nn.Linear(768, 2)`) records none, and then class indices "0".."N-1", pool
    "last-real" and the context length are used, with a notice on stderr saying so.

    Args:
        labels: class names in index order (their count must be the head's outputs); overrides recorded ones.
        pool: "last-real" or "last" (the book's: every text padded to max_length, its last position read).
        max_length: tokens per text (with pool "last", the max_length the model was trained with).
        n_heads: as for load_gpt2 (a book-layout .pth of a width no GPT-2 size has).
    """
    if pool is not None and pool not in POOLS:
        raise Gpt2LoadError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
    recorded = _recorded(model, model_metadata(model, source, weights_dir, n_heads=n_heads).get("classifier"))
    net = load_gpt2(model, source, weights_dir, device=device, dtype=dtype, quiet=True, n_heads=n_heads)
    outputs = net.out_head.out_features
    if outputs == net.cfg.vocab_size:
        raise Gpt2LoadError(
            f"{model} has a language-model head ({outputs} outputs, one per token), not a classifier: fine-tune one "
            "with gpt2load finetune classify, or give it a head with one output per class (the book's chapter 6)"
        )
    names = list(labels) if labels is not None else recorded.get("labels")
    if labels is not None and (len(names) != outputs or len(set(names)) != len(names)):
        raise Gpt2LoadError(
            f"--labels names {len(names)} classes ({','.join(map(str, names))}) but {model}'s head has {outputs} "
            f"outputs: give {outputs} different names, in the head's order"
        )
    if not recorded:  # say which defaults stand in for what the model does not record
        defaults = [f"labels 0..{outputs - 1} (name them with --labels)"] if labels is None else []
        if pool is None:
            defaults.append("pool last-real (the book's chapter 6 reads the last position: --pool last)")
        if defaults:
            notice(f"{model} records no classifier settings; using {' and '.join(defaults)}")
    enc = load_tokenizer(model, source, weights_dir)
    pool = pool or recorded.get("pool") or "last-real"
    width = max_length if max_length is not None else recorded.get("max_length")
    return {"results": classify(net, enc, texts, names, pool=pool, max_length=width)}


__all__ = ["classify", "classify_texts", "parse_labels"]
