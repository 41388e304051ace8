"""One forward pass: every decoder calls the model's own modules, so adapters, hooks and other models work."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from book_gpt import book_loop, book_model
from oracle import TINY, pair
from torch import nn

import gpt2load
from gpt2load import BookModelWarning, beam_search, generate, generate_stream, left_pad
from gpt2load.generation.sampling import sample

PROMPT = torch.tensor([[5, 17, 33, 2, 8]])


class LoRALayer(nn.Module):
    """Appendix E's low-rank update: alpha * (x @ A @ B)."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.randn(rank, out_dim) * 0.5)  # nonzero, so the adapter changes the tokens
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """Appendix E's wrapper: the frozen Linear plus the adapter; it has no .weight or .bias of its own."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


@pytest.fixture(scope="module")
def lora():
    _, base = pair(TINY, seed=1)
    _, model = pair(TINY, seed=1)
    torch.manual_seed(0)
    replace_linear_with_lora(model, rank=4, alpha=2.0)
    return base, model.eval()


def reference(model, idx, n, temperature=0.0, top_k=None, seed=None):
    """The model called on the whole sequence at every step, no cache, same sampling as gpt2load."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(n):
        with torch.no_grad():
            logits = model(idx)[:, -1]
        idx = torch.cat((idx, sample(logits, temperature, top_k, None, gen)[:, None]), 1)
    return idx


def test_lora_greedy_and_sampled_equal_the_uncached_model(lora):
    base, model = lora
    got = generate(model, PROMPT, 20)
    assert torch.equal(got, reference(model, PROMPT, 20))
    assert not torch.equal(got, generate(base, PROMPT, 20))  # the adapters are used, not skipped
    sampled = generate(model, PROMPT, 20, temperature=0.9, top_k=20, seed=7)
    assert torch.equal(sampled, reference(model, PROMPT, 20, 0.9, 20, seed=7))


def test_lora_beams_equal_beams_over_the_uncached_model(lora):
    _, model = lora

    class Uncached(nn.Module):  # only `logits = model(idx)`: decoded by recomputing the window
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BookModelWarning)
        ref = beam_search(Uncached(model), PROMPT, 12, 3, eos_id=None, context_size=TINY.context_length)
    got = beam_search(model, PROMPT, 12, 3, eos_id=None)
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-4, atol=1e-4)


def test_lora_left_padded_batch_rows_equal_each_prompt_alone_uncached(lora):
    _, model = lora
    prompts = [[5, 17, 33, 2, 8], [9], [40, 41, 42]]
    idx, mask = left_pad(prompts, pad_id=0)
    out = generate(model, idx, 10, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = reference(model, torch.tensor([p]), 10)[0]
        assert torch.equal(out[row, -10:], alone[-10:])


def test_a_forward_hook_on_a_block_fires_during_generate(lora):
    base, _ = lora
    calls = []
    handle = base.trf_blocks[1].register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    try:
        generate(base, PROMPT, 6)
    finally:
        handle.remove()
    assert len(calls) == 6  # the prompt, then one call per new token (the last token is not fed back)


def test_a_hook_on_a_linear_sees_its_own_calls_and_can_change_the_output():
    _, model = pair(TINY, seed=2)
    with torch.inference_mode():
        plain = model(PROMPT)
    seen = []

    def hook(mod, args, out):
        seen.append(out.shape)
        return -4 * out

    handle = model.trf_blocks[1].att.W_value.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            hooked = model(PROMPT)
        assert seen == [(1, 5, 32)]  # called as a module, not bypassed by the fused q/k/v matmul
        assert not torch.allclose(hooked, plain, atol=1e-3)
        assert torch.equal(generate(model, PROMPT, 8), reference(model, PROMPT, 8))
    finally:
        handle.remove()
    with torch.inference_mode():
        torch.testing.assert_close(model(PROMPT), plain, rtol=0, atol=0)  # same code path again


def test_the_books_own_model_decodes_as_the_books_loop_with_one_warning():
    book = book_model()
    idx = torch.tensor([[1, 2, 3, 4]])
    with pytest.warns(BookModelWarning) as record:
        got = generate(book, idx, 12)
        generate(book, idx, 2)
    assert len([w for w in record if issubclass(w.category, BookModelWarning)]) == 1
    assert torch.equal(got, book_loop(book, idx, 12, 256))
    torch.manual_seed(123)
    sampled = generate(book, idx, 12, temperature=1.4, top_k=25)
    torch.manual_seed(123)
    assert torch.equal(sampled, book_loop(book, idx, 12, 256, temperature=1.4, top_k=25))
    assert beam_search(book, idx, 5, 2, eos_id=None).sequences.shape == (1, 9)


def test_generation_buffers_grow_with_use():
    _, model = pair(TINY, seed=0)
    steps = generate_stream(model, PROMPT, 10**12)  # nothing sized by max_new_tokens: no 8 TB up front
    assert len([s for _, s in zip(range(3), steps, strict=False)]) == 3
    # A head that says "end" at once: beam search with a huge limit stops after a step or two.
    with torch.no_grad():
        head = nn.Linear(TINY.emb_dim, TINY.vocab_size)
        head.bias.zero_()
        head.bias[7] = 100.0
    model.out_head = head
    res = beam_search(model, PROMPT, 10**12, 2, eos_id=7)
    assert res.sequences.shape[1] <= PROMPT.shape[1] + 2 and int(res.sequences[0, -1]) == 7


def test_training_forward_is_unchanged_by_the_fast_paths():
    _, model = pair(TINY, seed=0)
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(x)
    slow = model(x)  # autograd on: the modules' own operations
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    model.train()
    try:
        with torch.no_grad():  # dropout of 0 in train mode: the plain path, same numbers
            torch.testing.assert_close(model(x), fast, rtol=1e-5, atol=1e-5)
    finally:
        model.eval()


def test_public_names_resolve():
    assert callable(gpt2load.generate) and callable(gpt2load.left_pad)
    idx, mask = gpt2load.left_pad([[1, 2], [3]])
    assert idx.shape == mask.shape == (2, 2)
    package = Path(gpt2load.__file__).parent
    assert not (package / "generate.py").exists()  # the function, not shadowing a module of that name
