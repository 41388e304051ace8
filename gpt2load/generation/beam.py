"""Beam search with the KV cache, reproducing transformers' (>= 4.49) vectorized beam search token for token.

Each step, for every prompt: add each beam's running log-probability to the next-token log-probabilities of that
beam, take the best 2 * num_beams candidates over all beams, continue the best num_beams that do not end, and
offer the candidates that end (EOS, or the last step) among the top num_beams to a list of num_beams finished
hypotheses, scored as sum of log-probabilities / new_length ** length_penalty. transformers' stopping rules:

* early_stopping=True: stop once num_beams hypotheses are finished.
* early_stopping=False: stop when the best running beam, scored at the current length, cannot beat the worst
  finished hypothesis (a heuristic).
* early_stopping="never": the same, scoring the running beam at max length when length_penalty > 0 (exact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Gpt2LoadError
from ..tokenizer import EOT_ID
from .decoding import check_context, check_prompt, make_decoder, model_vocab
from .sampling import GenerationConfig, check_lengths

_NEG = -1.0e9  # transformers' "impossible" score


class BeamResult(NamedTuple):
    """Beam search output; row r * num_return_sequences + i is the i-th best sequence of prompt r."""

    sequences: torch.Tensor  # [B * n, T + L]: prompt + new tokens, padded on the right with eos_id (or 0)
    scores: torch.Tensor  # [B * n]: sum of the new tokens' log-probabilities / L_i ** length_penalty
    lengths: torch.Tensor  # [B * n]: L_i, the number of new tokens of each sequence (a final EOS included)


def check_beam(num_beams: int, num_return_sequences: int, length_penalty: float, early_stopping: bool | str) -> None:
    """Raise a Gpt2LoadError naming the first bad beam-search setting."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise Gpt2LoadError(f"num_beams must be a whole number >= 1, got {num_beams!r}")
    if (
        isinstance(num_return_sequences, bool)
        or not isinstance(num_return_sequences, int)
        or not 1 <= num_return_sequences <= num_beams
    ):
        raise Gpt2LoadError(
            f"num_return_sequences must be between 1 and num_beams ({num_beams}), got {num_return_sequences!r}"
        )
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, (int, float))
        or length_penalty != length_penalty
    ):
        raise Gpt2LoadError(f"length_penalty must be a number, got {length_penalty!r}")
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise Gpt2LoadError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")


def beam_search(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    eos_id: int | None = EOT_ID,
    num_return_sequences: int = 1,
    *,
    context_size: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    vocab_limit: int | None = None,
) -> BeamResult:
    """The most likely continuations of each prompt row by beam search (deterministic).

    Args:
        model: a GPTModel, or any model called as `logits = model(idx)` (see `generate`).
        idx: token ids [B, T] (rows of the same length).
        max_new_tokens: the longest continuation.
        num_beams: beams kept per prompt.
        length_penalty: exponent of the length that divides a finished sequence's log-probability; > 0 favours
            longer sequences, < 0 shorter ones.
        early_stopping: True, False or "never" (see the module docstring), as in transformers.
        eos_id: the id that ends a sequence (None: sequences end at max_new_tokens only).
        num_return_sequences: how many of the best sequences to return per prompt (<= num_beams).
        context_size: the window, as in `generate` (decoding past it slides the window).
        should_stop: asked before every step; once it returns True the search ends there (a server's client
            went away) and the result is incomplete: to be thrown away.
        vocab_limit: only ids below it are chosen (a vocabulary padded past the tokenizer's, as llm.c's and
            nanoGPT's: the padding rows are no tokens).

    Returns:
        BeamResult(sequences, scores, lengths), best first for each prompt, equal to transformers'
        `generate(num_beams=..., do_sample=False, ...)` `sequences` and `sequences_scores`.
    """
    check_prompt(model, idx)
    check_lengths(max_new_tokens)
    check_beam(num_beams, num_return_sequences, length_penalty, early_stopping)
    check_context(model, context_size)
    GenerationConfig(max_new_tokens, eos_id=eos_id).check_vocab(model_vocab(model))
    with torch.inference_mode():
        result = _search(
            model,
            idx,
            max_new_tokens,
            num_beams,
            float(length_penalty),
            early_stopping,
            eos_id,
            num_return_sequences,
            context_size,
            should_stop,
            vocab_limit,
        )
    return BeamResult(*(t.clone() for t in result))  # plain tensors, usable outside inference mode


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[b, index[b, j], ...] for t [B, K, ...] and index [B, J]."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


def _widen(t: torch.Tensor, cap: int, pad: int) -> torch.Tensor:
    """t [B, K, n] padded on the right to [B, K, cap]."""
    return torch.cat((t, t.new_full((*t.shape[:2], cap - t.shape[2]), pad)), 2)


def _search(model, idx, L, K, lp, early_stopping, eos_id, n_return, context_size, should_stop=None, limit=None):
    B, P = idx.shape
    device = idx.device
    pad = eos_id if eos_id is not None else 0
    if L == 0:
        return (
            idx.repeat_interleave(n_return, 0),
            torch.zeros(B * n_return, device=device),
            torch.zeros(B * n_return, dtype=torch.long, device=device),
        )
    dec = make_decoder(model, idx, L, context_size)
    dec.reorder(torch.arange(B, device=device).repeat_interleave(K))  # K copies of each prompt's cache
    n_cand = 2 * K  # enough candidates that K of them always continue (at most K can end with EOS)
    in_top_k = torch.arange(n_cand, device=device) < K
    beam_offset = torch.arange(B, device=device)[:, None] * K

    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = _NEG  # the beams start identical: only the first one may expand
    cap = min(L, 64)  # token columns held; grows with use, so a huge max_new_tokens allocates nothing up front
    run_tokens = torch.full((B, K, cap), pad, dtype=torch.long, device=device)
    fin_scores = torch.full((B, K), _NEG, device=device)
    fin_tokens = torch.full((B, K, cap), pad, dtype=torch.long, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # may a running beam still beat the finished?

    logits = dec.logits
    for step in range(1, L + 1):
        if should_stop is not None and should_stop():
            break
        if step > cap:
            cap = min(L, 2 * cap)
            run_tokens, fin_tokens = (_widen(t, cap, pad) for t in (run_tokens, fin_tokens))
        logp = F.log_softmax((logits if limit is None else logits[:, :limit]).float(), dim=-1)
        V = logp.shape[-1]
        total = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        cand_scores, flat = torch.topk(total, n_cand)  # [B, 2K], best first
        src, tok = flat // V, flat % V
        cand_tokens = _gather(run_tokens, src)
        cand_tokens[:, :, step - 1] = tok
        ends = tok == eos_id if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        if step == L:
            ends = torch.ones_like(ends)

        # The K best candidates that go on.
        going = cand_scores + ends.float() * _NEG
        keep = torch.topk(going, K).indices
        run_scores = going.gather(1, keep)
        run_tokens = _gather(cand_tokens, keep)
        parent = src.gather(1, keep) + beam_offset

        # Candidates among the top K that end join the finished list if they are among its K best.
        ended = ends & in_top_k
        offer = cand_scores / (step**lp)
        offer = offer + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * _NEG
        offer = offer + (~improvable).float() * _NEG
        offer = offer + (~ended).float() * _NEG
        best = torch.topk(torch.cat((fin_scores, offer), 1), K).indices
        fin_scores = torch.cat((fin_scores, offer), 1).gather(1, best)
        fin_tokens = _gather(torch.cat((fin_tokens, cand_tokens), 1), best)
        fin_len = torch.cat((fin_len, torch.full_like(cand_tokens[:, :, 0], step)), 1).gather(1, best)
        fin_done = torch.cat((fin_done, ended), 1).gather(1, best)

        best_len = L if early_stopping == "never" and lp > 0 else step
        best_running = run_scores[:, :1] / (best_len**lp)
        worst_finished = torch.where(fin_done, fin_scores.min(1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not bool(improvable.any()) or (early_stopping is True and bool(fin_done.all())) or bool(ends.all()):
            break
        dec.reorder(parent.flatten())
        logits = dec.step(run_tokens[:, :, step - 1].flatten())

    scores = fin_scores[:, :n_return].reshape(-1)
    lengths = fin_len[:, :n_return].reshape(-1)
    new = fin_tokens[:, :n_return].reshape(B * n_return, cap)[:, : int(lengths.max())]
    return torch.cat((idx.repeat_interleave(n_return, 0), new), 1), scores, lengths


__all__ = ["BeamResult", "beam_search", "check_beam"]
