"""Beam search against transformers' vectorized beam search: tokens identical, sequence scores allclose."""

import pytest
import torch
from oracle import TINY, pair

from gpt2load import generate
from gpt2load.errors import Gpt2LoadError
from gpt2load.generation.beam import beam_search

L = 12  # new tokens
PROMPT = torch.tensor([[5, 17, 33, 2, 8]])
# (num_beams, length_penalty, early_stopping, num_return_sequences, model seed, eos id). The eos ids are tokens
# these random models really produce, so beams end with EOS while others run to max_new_tokens.
CASES = [
    (2, 1.0, False, 1, 0, 92),
    (2, 0.5, True, 2, 0, 92),
    (4, 2.0, "never", 2, 0, 92),
    (4, 1.0, True, 2, 0, 81),
    (4, 0.5, False, 4, 1, 32),
    (2, 1.0, "never", 2, 1, 32),
    (4, 2.0, True, 3, 2, 75),
    (3, 1.0, False, 3, 2, None),
    (4, 0.5, "never", 1, 2, 75),
    (2, 2.0, False, 2, 1, 32),
]


@pytest.fixture(scope="module")
def models():
    return {seed: pair(TINY, seed) for seed in (0, 1, 2)}


def run_both(hf, ours, prompt, k, lp, es, n, eos):
    ref = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        num_beams=k,
        length_penalty=lp,
        early_stopping=es,
        num_return_sequences=n,
        max_new_tokens=L,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return ref, beam_search(ours, prompt, L, k, lp, es, eos, n)


@pytest.mark.parametrize(("k", "lp", "es", "n", "seed", "eos"), CASES)
def test_beam_search_matches_transformers(models, k, lp, es, n, seed, eos):
    ref, got = run_both(*models[seed], PROMPT, k, lp, es, n, eos)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)
    assert got.lengths.max() == got.sequences.shape[1] - PROMPT.shape[1]


def test_the_settings_end_beams_with_eos_and_at_max_length(models):
    ended = running = 0
    for k, lp, es, n, seed, eos in CASES:
        res = beam_search(models[seed][1], PROMPT, L, k, lp, es, eos, n)
        for seq, length in zip(res.sequences, res.lengths.tolist(), strict=True):
            if eos is not None and seq[PROMPT.shape[1] + length - 1] == eos:
                ended += 1
            elif length == L:
                running += 1
    assert ended >= 5 and running >= 5
    mixed = beam_search(models[1][1], PROMPT, L, 2, 1.0, "never", 32, 2)  # one of each in the same result
    assert sorted(mixed.lengths.tolist()) == [1, L] and mixed.sequences[1, PROMPT.shape[1]] == 32


def test_batch_of_prompts_matches_transformers(models):
    prompt = torch.tensor([[5, 17, 33, 2, 8], [9, 9, 1, 4, 60]])
    for k, es in ((3, False), (4, True), (2, "never")):
        ref, got = run_both(*models[1], prompt, k, 1.0, es, 2, 32)
        assert torch.equal(got.sequences, ref.sequences)
        torch.testing.assert_close(got.scores, ref.sequences_scores, rtol=1e-5, atol=1e-5)


def test_one_beam_is_greedy_even_past_the_window(models):
    _, ours = models[0]
    idx = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(0))
    got = beam_search(ours, idx, 60, 1, eos_id=None)  # 80 tokens > the 64-token context: the window slides
    assert torch.equal(got.sequences, generate(ours, idx, 60))


def test_zero_new_tokens_returns_the_prompt(models):
    res = beam_search(models[0][1], PROMPT, 0, 2, num_return_sequences=2, eos_id=None)
    assert torch.equal(res.sequences, PROMPT.repeat(2, 1)) and res.lengths.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(num_beams=0), "num_beams"),
        (dict(num_return_sequences=3), "num_return_sequences"),
        (dict(early_stopping="yes"), "early_stopping"),
        (dict(early_stopping=1.0), "early_stopping"),
        (dict(length_penalty="long"), "length_penalty"),
        (dict(max_new_tokens=-2), "max_new_tokens"),
        (dict(eos_id=96), "eos_id"),
    ],
)
def test_bad_beam_settings(models, kw, match):
    args = {"max_new_tokens": 4, "num_beams": 2, **kw}
    with pytest.raises(Gpt2LoadError, match=match):
        beam_search(models[0][1], PROMPT, **args)
