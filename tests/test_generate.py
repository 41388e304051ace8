"""Greedy decoding, sampling, batching, streaming and stop strings, against transformers and the book's loop."""

import json
import math
import warnings

import pytest
import torch
from helpers import TOKENIZER_DIR
from oracle import TINY, pair
from transformers.generation.logits_process import TopPLogitsWarper

from gpt2load import PromptTruncatedWarning, complete, generate, generate_stream, left_pad
from gpt2load.errors import Gpt2LoadError
from gpt2load.generation.decoding import CachedDecoder
from gpt2load.generation.sampling import apply_repetition_penalty, apply_temperature, sample, top_k_filter, top_p_filter
from gpt2load.generation.text import stream_text
from gpt2load.model.config import GPTConfig
from gpt2load.tokenizer import EOT_ID, decode_ids, tokenizer_from_folder

BIG_VOCAB = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
PROMPT = torch.tensor([[5, 17, 33, 2, 8]])


@pytest.fixture(scope="module")
def tiny():
    return pair(TINY, seed=0)


@pytest.fixture(scope="module")
def tiny1():
    return pair(TINY, seed=1)


@pytest.fixture(scope="module")
def big():
    return pair(BIG_VOCAB, seed=0)[1]


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


def book_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    """The book's chapter-5 `generate`: recompute idx[:, -context_size:] at every step, no cache."""
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            logits = torch.where(logits < top_logits[:, -1], torch.tensor(float("-inf")), logits)
        if temperature > 0.0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1)
        else:
            nxt = logits.argmax(-1, keepdim=True)
        if nxt == eos_id:
            break
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def test_book_sampling_is_reproduced_with_the_books_seeding(tiny):
    _, ours = tiny
    torch.manual_seed(123)
    ref = book_generate(ours, PROMPT, 25, 64, temperature=4.0, top_k=25)
    torch.manual_seed(123)
    got = generate(model=ours, idx=PROMPT, max_new_tokens=25, context_size=64, top_k=25, temperature=4.0)
    assert torch.equal(got, ref)


# --- sampling functions on hand-made distributions --------------------------------------------------------------


def test_top_p_keeps_the_exact_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = {p: (top_p_filter(logits, p) > -math.inf)[0].nonzero().flatten().tolist() for p in (0.3, 0.75, 0.85, 1)}
    assert kept == {0.3: [0], 0.75: [0, 1], 0.85: [0, 1, 2], 1: [0, 1, 2, 3]}


def test_top_p_matches_transformers_warper():
    logits = torch.randn(8, 96, generator=torch.Generator().manual_seed(0)) * 3
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(p)(None, logits)
        assert torch.equal(top_p_filter(logits, p), ref)


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert (top_k_filter(logits, 2) > -math.inf).tolist() == [[False, True, True, False]]
    assert torch.equal(top_k_filter(logits, 10), logits)
    probs = apply_temperature(logits, 0.5).softmax(-1)
    expected = logits.softmax(-1) ** 2
    torch.testing.assert_close(probs, expected / expected.sum())
    # sampling follows softmax(logits / T): [1, 3] odds at T=1 become [1, 9] at T=0.5
    two = torch.tensor([[0.0, math.log(3)]]).expand(4000, 2)
    gen = torch.Generator().manual_seed(0)
    assert abs(sample(two, 1.0, generator=gen).float().mean().item() - 0.75) < 0.03
    assert abs(sample(two, 0.5, generator=gen).float().mean().item() - 0.9) < 0.03


def test_greedy_and_top_k_one_are_argmax():
    logits = torch.randn(6, 96, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.3, top_k=1, generator=gen), logits.argmax(-1))


def test_repetition_penalty_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


# --- against transformers and the book ---------------------------------------------------------------------------


def test_greedy_matches_transformers(tiny, tiny1):
    for hf, ours in (tiny, tiny1):
        ref = hf.generate(PROMPT, do_sample=False, max_new_tokens=30, pad_token_id=95, eos_token_id=None)
        assert torch.equal(generate(ours, PROMPT, 30), ref)


@pytest.mark.parametrize("penalty", [0.7, 1.3, 3.0])
def test_repetition_penalty_matches_transformers(tiny1, penalty):
    hf, ours = tiny1
    prompt = torch.tensor([[5, 17, 33, 2, 8], [9, 9, 1, 4, 60]])
    ref = hf.generate(
        prompt,
        do_sample=False,
        max_new_tokens=20,
        repetition_penalty=penalty,
        pad_token_id=95,
        eos_token_id=None,
        attention_mask=torch.ones_like(prompt),
    )
    got = generate(ours, prompt, 20, repetition_penalty=penalty)
    assert torch.equal(got, ref)
    if penalty == 3.0:  # the penalty must actually change something here
        assert not torch.equal(got, generate(ours, prompt, 20))


def test_sampling_matches_transformers_with_the_same_global_seed(tiny):
    hf, ours = tiny
    kw = dict(temperature=4.0, top_k=20, top_p=0.95)
    torch.manual_seed(7)
    ref = hf.generate(PROMPT, do_sample=True, max_new_tokens=25, pad_token_id=95, eos_token_id=None, **kw)
    torch.manual_seed(7)
    got = generate(ours, PROMPT, 25, **kw)
    assert torch.equal(got, ref) and not torch.equal(got, generate(ours, PROMPT, 25))


def test_min_new_tokens_matches_transformers(tiny):
    hf, ours = tiny
    eos = int(generate(ours, PROMPT, 1)[0, -1])  # the first greedy token: EOS right away without min_new_tokens
    assert generate(ours, PROMPT, 10, eos_id=eos).shape[1] == PROMPT.shape[1]
    ref = hf.generate(PROMPT, do_sample=False, max_new_tokens=10, min_new_tokens=4, eos_token_id=eos, pad_token_id=eos)
    got = generate(ours, PROMPT, 10, eos_id=eos, min_new_tokens=4)
    assert torch.equal(got, ref[:, : got.shape[1]])
    assert got.shape[1] > PROMPT.shape[1] + 4


def test_kv_cache_equals_full_recompute(tiny):
    _, ours = tiny
    idx = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        dec = CachedDecoder(ours, idx, 20)
        for _ in range(20):
            full = ours(dec.seq[:, : dec.length])[:, -1]
            torch.testing.assert_close(dec.logits, full, rtol=1e-5, atol=1e-5)
            dec.step(dec.logits.argmax(-1))
    assert torch.equal(generate(ours, idx, 20), book_generate(ours, idx, 20, TINY.context_length))


def test_last_only_forward_with_a_cache_equals_the_plain_forward(tiny):
    _, ours = tiny
    idx = torch.randint(0, 96, (3, 45), generator=torch.Generator().manual_seed(1))
    ref = ours(idx)  # with autograd on: the modules' plain path
    with torch.inference_mode():  # the stock modules' fast path
        for split in (9, 40):
            cache = ours.new_cache(3, 50)
            got = ours(idx[:, :split], cache=cache, last_only=True)
            chunk = ours(idx[:, split:], cache=cache, last_only=True)  # a chunk after cached positions
            assert got.shape == (3, 1, 96)
            torch.testing.assert_close(got[:, 0], ref[:, split - 1].detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(chunk[:, 0], ref[:, -1].detach(), rtol=1e-5, atol=1e-5)


def test_sliding_window_equals_the_books_loop(tiny):
    _, ours = tiny
    idx = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(ours, idx, 50), book_generate(ours, idx, 50, 64))  # past the model's 64
    with pytest.warns(PromptTruncatedWarning):
        assert torch.equal(generate(ours, idx, 12, 16), book_generate(ours, idx, 12, 16))  # a smaller window


def test_long_prompt_keeps_its_tail_and_warns(tiny):
    _, ours = tiny
    idx = torch.randint(0, 96, (1, 80), generator=torch.Generator().manual_seed(2))
    with pytest.warns(PromptTruncatedWarning, match="last 64 tokens"):
        out = generate(ours, idx, 5)
    assert torch.equal(out[:, :80], idx)
    assert torch.equal(out[:, 80:], generate(ours, idx[:, -64:], 5)[:, 64:])


def test_batch_of_different_lengths_equals_each_prompt_alone(tiny1):
    hf, ours = tiny1
    prompts = [[5, 17, 33, 2, 8, 11, 12], [9, 4], [1, 2, 3, 70]]
    idx, mask = left_pad(prompts)  # padded with EOT_ID, outside this model's vocabulary: pads are never looked up
    for kw in ({}, {"repetition_penalty": 1.2}):
        out = generate(ours, idx, 15, attention_mask=mask, **kw)
        for row, p in enumerate(prompts):
            assert out[row, -15:].tolist() == generate(ours, torch.tensor([p]), 15, **kw)[0, -15:].tolist()
    idx = idx.masked_fill(mask == 0, 0)
    ref = hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=15, pad_token_id=0)
    assert torch.equal(generate(ours, idx, 15, attention_mask=mask), ref)
    # a padded batch past the window still matches each prompt alone
    out = generate(ours, idx, 70, attention_mask=mask)
    assert out[1, -70:].tolist() == generate(ours, torch.tensor([prompts[1]]), 70)[0, -70:].tolist()


def test_eos_stops_rows_and_pads_them(tiny1):
    hf, ours = tiny1
    prompt = torch.tensor([[5, 17, 33, 2, 8], [1, 2, 3, 4, 5]])
    free = generate(ours, prompt, 10, repetition_penalty=3.0)[:, 5:].tolist()
    eos = 61  # row 1 produces it at step 2, row 0 at step 6
    assert free[1].index(eos) == 2 and free[0].index(eos) == 6
    got = generate(ours, prompt, 10, eos_id=eos, repetition_penalty=3.0)
    assert got[:, 5:].tolist() == [free[0][:6], free[1][:3] + [eos] * 3]  # the last EOS is not appended (book)
    ref = hf.generate(
        prompt,
        do_sample=False,
        max_new_tokens=10,
        repetition_penalty=3.0,
        eos_token_id=eos,
        pad_token_id=eos,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(got, ref[:, :-1])
    assert generate(ours, prompt[:1], 10, eos_id=eos, repetition_penalty=3.0)[0, 5:].tolist() == free[0][:6]


def test_seed_reproducible_and_private(tiny):
    _, ours = tiny
    state = torch.get_rng_state()
    a = generate(ours, PROMPT, 20, temperature=4.0, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, generate(ours, PROMPT, 20, temperature=4.0, seed=11))
    assert not torch.equal(a, generate(ours, PROMPT, 20, temperature=4.0, seed=12))
    gen = torch.Generator().manual_seed(11)
    assert torch.equal(a, generate(ours, PROMPT, 20, temperature=4.0, generator=gen))


def test_stream_yields_the_tokens_of_generate(tiny):
    _, ours = tiny
    steps = list(generate_stream(ours, PROMPT, 12, temperature=4.0, seed=4))
    assert torch.equal(torch.cat([PROMPT, torch.stack(steps, 1)], 1), generate(ours, PROMPT, 12, None, 4.0, seed=4))
    stream = generate_stream(ours, PROMPT, 1000)  # breaking out early stops the work
    assert [int(next(stream)) for _ in range(3)] == generate(ours, PROMPT, 3)[0, 5:].tolist()
    stream.close()


# --- text: streaming, stop strings, the CLI's function -----------------------------------------------------------


def test_stream_text_handles_split_characters(enc):
    text = "naïve café 🙂👍🏽 世界 ∑"
    ids = enc.encode(text)
    assert any(enc.decode([t]) != enc.decode_single_token_bytes(t).decode("utf-8", "ignore") for t in ids)
    pieces = list(stream_text(enc, ids))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    rand = torch.randint(0, 50257, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    assert "".join(stream_text(enc, rand)) == enc.decode(rand)


def test_complete_streams_and_matches_generate(big, enc):
    pieces = []
    out = complete(big, enc, "The book says", max_new_tokens=40, on_text=pieces.append)
    ids = enc.encode("The book says")
    assert out["prompt_ids"] == ids
    (c,) = out["completions"]
    assert set(c) == {"token_ids", "text", "score"} and c["score"] is None
    assert c["token_ids"] == generate(big, torch.tensor([ids]), 40, eos_id=EOT_ID)[0, len(ids) :].tolist()
    assert c["text"] == enc.decode(c["token_ids"]) == "".join(pieces)


def test_stop_string_cuts_text_and_ends_the_loop(big, enc):
    full = complete(big, enc, "Once upon a time", max_new_tokens=40)["completions"][0]
    text, toks = full["text"], full["token_ids"]
    starts = [len(enc.decode(toks[:i])) for i in range(len(toks))]
    # a stop string over at least two tokens, starting inside one, first occurring in the middle of the text
    i = next(i for i in range(4, len(toks) - 3) if starts[i + 2] - starts[i] >= 3 and starts[i + 1] - starts[i] >= 2)
    stop = text[starts[i] + 1 : starts[i + 2] + 1]
    assert len(enc.encode(stop)) >= 2
    cut = text.index(stop)
    calls = []
    hook = big.register_forward_hook(lambda *a: calls.append(1))
    pieces = []
    try:
        out = complete(
            big, enc, "Once upon a time", max_new_tokens=40, stop=["zzzz-never", stop], on_text=pieces.append
        )
    finally:
        hook.remove()
    c = out["completions"][0]
    assert c["text"] == text[:cut] == "".join(pieces)
    assert c["token_ids"] == toks[: len(c["token_ids"])] and len(c["token_ids"]) < len(toks)
    assert enc.decode(c["token_ids"]).startswith(c["text"])
    assert len(calls) <= i + 3 < 40  # the loop stopped once the stop string appeared


def test_complete_several_prompts_empty_prompt_and_seed(big, enc):
    outs = complete(big, enc, ["", "Hello"], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    assert [o["prompt_ids"] for o in outs] == [[EOT_ID], enc.encode("Hello")]
    again = complete(big, enc, ["", "Hello"], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    assert outs == again


def test_complete_with_beams_returns_scores(big, enc):
    out = complete(big, enc, "Beams", max_new_tokens=6, num_beams=3, num_return_sequences=2)
    scores = [c["score"] for c in out["completions"]]
    assert len(scores) == 2 and scores[0] >= scores[1] and all(isinstance(s, float) for s in scores)


def test_prompt_outside_a_small_vocab_is_refused(tiny, enc):
    _, ours = tiny
    with pytest.raises(Gpt2LoadError, match="outside the model's vocabulary of 96"):
        complete(ours, enc, "hello world")
    with pytest.raises(Gpt2LoadError, match="outside the model's vocabulary"):
        generate(ours, torch.tensor([[3, 96]]), 2)


# --- bad input ---------------------------------------------------------------------------------------------------

BAD = [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(min_new_tokens=9), "min_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, temperature=0.7), "beam search"),
    (dict(num_beams=2, top_k=5), "beam search"),
    (dict(num_beams=2, repetition_penalty=1.2), "beam search"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(stop=[""]), "stop strings"),
    (dict(context_size=65), "context_size"),
    (dict(context_size=0), "context_size"),
]


@pytest.mark.parametrize(("kw", "match"), BAD, ids=[f"{m}-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_settings_are_one_line_errors(big, enc, kw, match):
    kw = {"max_new_tokens": 5, **kw}
    with pytest.raises(Gpt2LoadError, match=match) as err:
        complete(big, enc, "x", **kw)
    assert "\n" not in str(err.value)


def test_bad_tensor_inputs(tiny):
    _, ours = tiny
    with pytest.raises(Gpt2LoadError, match=r"\[batch, tokens\]"):
        generate(ours, torch.tensor([1, 2, 3]), 2)
    with pytest.raises(Gpt2LoadError, match="empty"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(Gpt2LoadError, match="left padding"):
        generate(ours, torch.tensor([[1, 2]]), 2, attention_mask=torch.tensor([[1, 0]]))
    with pytest.raises(Gpt2LoadError, match="seed or generator"):
        generate(ours, PROMPT, 2, temperature=1.0, seed=1, generator=torch.Generator())
    with pytest.raises(Gpt2LoadError, match="eos_id"):
        generate(ours, PROMPT, 2, eos_id=500)
    with pytest.raises(Gpt2LoadError, match="max_new_tokens"):
        generate_stream(ours, PROMPT, -1)  # checked before the first step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(ours, PROMPT, 0).shape == PROMPT.shape


def test_ids_past_the_tokenizer_are_never_generated_and_print_a_marker(tmp_path):
    """A nanoGPT-style padded vocabulary (50304 rows): the CLI never generates an id with no token, even when
    it scores highest; `generate` itself (ids, no tokenizer) may, and such an id decodes as a marker."""
    from helpers import run_cli

    from gpt2load import save_model
    from gpt2load.model.gpt import GPTModel

    model = GPTModel(GPTConfig(vocab_size=50304, context_length=32, emb_dim=16, n_heads=2, n_layers=1))
    model.untie_head()
    with torch.no_grad():  # final_norm gives the same unit vector everywhere; only row 50300 of the head sees it
        model.final_norm.scale.zero_()
        model.final_norm.shift.zero_()
        model.final_norm.shift[0] = 1.0
        model.out_head.weight.zero_()
        model.out_head.weight[50300, 0] = 10.0
    save_model(model, tmp_path / "padded", TOKENIZER_DIR)
    proc = run_cli(
        "generate",
        "--model",
        str(tmp_path / "padded"),
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)["completions"][0]
    assert len(done["token_ids"]) == 2 and max(done["token_ids"]) < 50257 and "<|id:" not in done["text"]
    with torch.inference_mode():
        assert int(model(torch.tensor([[17250]]))[0, -1].argmax()) == 50300  # it would have won
    assert decode_ids(tokenizer_from_folder(TOKENIZER_DIR), [50300, 50300]) == "<|id:50300|><|id:50300|>"
