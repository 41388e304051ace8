"""Every kernel choice decodes the same tokens as the plain modules; batches decode each row as it would alone;
the KV cache reorders rows in place."""

import copy

import pytest
import torch
from oracle import TINY, pair, with_kernels

from gpt2load import Gpt2LoadError, beam_search, generate, left_pad
from gpt2load.fast import kernels as k
from gpt2load.fast.kernels import split_pieces
from gpt2load.fast.registry import Kernels
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import KVCache
from gpt2load.model.quant import quantize_model
from gpt2load.settings import KernelSettings

PROMPT = torch.tensor([[5, 17, 33, 2, 8], [9, 9, 1, 40, 77]])


# Wide enough that `_split` cuts every matmul into blocks (a prime vocabulary: blocks plus a remainder row)
WIDE = GPTConfig(vocab_size=257, context_length=64, emb_dim=128, n_heads=4, n_layers=2)


@pytest.fixture(scope="module")
def model():
    return pair(TINY, seed=1)[1]


@pytest.fixture(scope="module")
def wide():
    return pair(WIDE, seed=2)[1]


def plain_greedy(model, idx, n):
    """The book's loop through the plain modules: in training mode no module takes a fast path (dropout is 0)."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("setting", ["0", "1", "auto"])
def test_every_fp32_kernel_choice_decodes_the_plain_tokens(model, setting):
    model = copy.deepcopy(model)
    with_kernels(model, onednn=setting)
    assert torch.equal(generate(model, PROMPT, 12), plain_greedy(model, PROMPT, 12))
    with torch.inference_mode():
        torch.testing.assert_close(model(PROMPT), copy.deepcopy(model).train()(PROMPT).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("setting", ["0", "1", "auto"])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_matches_f_linear_for_every_setting(setting, rows, gelu):
    linear = Kernels(KernelSettings(onednn=setting)).linear
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 48, generator=g), torch.randn(80, 48, generator=g), torch.randn(80, generator=g)
    want = torch.nn.functional.linear(x, w, b)
    want = torch.nn.functional.gelu(want, approximate="tanh") if gelu else want
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b, gelu), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["plain", "onednn", "split", "auto"])
def test_every_forced_kernel_decodes_the_plain_tokens(wide, kernel):
    wide = copy.deepcopy(wide)
    kernels = with_kernels(wide, matmul=kernel)
    prompt = torch.randint(0, WIDE.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(wide, prompt, 12), plain_greedy(wide, prompt, 12))
    idx, mask = left_pad([prompt[0, 2:].tolist(), prompt[1].tolist()])
    out = generate(wide, idx, 8, attention_mask=mask)
    assert torch.equal(out[0, -8:], generate(wide, prompt[:1, 2:], 8)[0, -8:])
    beams = beam_search(wide, prompt[:1], 8, 3, eos_id=None)
    used = {getattr(fn, "kernel", fn) for fn in kernels.linear_choices.values()}
    if kernel == "split":  # every matmul of this model, in every call above, had at most 16 rows: all split
        assert used == {k._split}
    elif kernel == "onednn" and k.onednn_works(torch.float32):
        assert used == {k._onednn}
    elif kernel == "plain":
        assert used == {k._plain}
    with_kernels(wide, matmul="plain")
    plain = beam_search(wide, prompt[:1], 8, 3, eos_id=None)
    assert torch.equal(beams.sequences, plain.sequences)
    torch.testing.assert_close(beams.scores, plain.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("out", [256, 257])  # blocks only; blocks and a remainder row
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_split_kernel_matches_f_linear(out, rows, bias, gelu):
    linear = Kernels(KernelSettings(matmul="split")).linear
    g = torch.Generator().manual_seed(out + rows)
    x, w = torch.randn(2, rows, 96, generator=g), torch.randn(out, 96, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    want = torch.nn.functional.linear(x, w, b)
    want = torch.nn.functional.gelu(want, approximate="tanh") if gelu else want
    with torch.inference_mode():
        got = linear(x, w, b, gelu)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert got.shape == (2, rows, out) and got.is_contiguous()


def test_split_kernel_takes_empty_inputs_and_strided_biases():
    linear = Kernels(KernelSettings(matmul="split")).linear
    g = torch.Generator().manual_seed(7)
    w, b = torch.randn(256, 96, generator=g), torch.randn(512, generator=g)[::2]  # same shape, other strides
    with torch.inference_mode():
        for x in (torch.randn(3, 96, generator=g), torch.randn(0, 96), torch.randn(2, 0, 96)):
            for bias in (b.contiguous(), b):
                want = torch.nn.functional.linear(x, w, bias)
                torch.testing.assert_close(linear(x, w, bias), want, atol=1e-4, rtol=1e-4)


def test_split_pieces_divide_the_rows_or_leave_a_remainder():
    assert split_pieces(768, 2) == 2 and split_pieces(3072, 4) == 4 and split_pieces(2304, 3) == 3
    assert split_pieces(50257, 2) == 4  # prime-ish vocabulary: 4 blocks of 12564 rows and 1 row more
    assert split_pieces(100, 2) == 0  # blocks would be tiny: not used


def test_matmul_settings_that_cannot_hold_name_the_variables():
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_MATMUL='fastest'"):
        KernelSettings.from_env({"GPT2LOAD_MATMUL": "fastest"})
    with pytest.raises(Gpt2LoadError, match="contradicts GPT2LOAD_ONEDNN=1"):
        KernelSettings.from_env({"GPT2LOAD_MATMUL": "split", "GPT2LOAD_ONEDNN": "1"})
    assert KernelSettings.from_env({"GPT2LOAD_MATMUL": "split", "GPT2LOAD_ONEDNN": "0"}).matmul_mode == "split"
    assert KernelSettings.from_env({"GPT2LOAD_ONEDNN": "0"}).matmul_mode == "no-onednn"
    assert KernelSettings.from_env({"GPT2LOAD_MATMUL": " Split "}).matmul == "split"  # as written by people


def test_bad_kernel_setting_names_the_variable():
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_ONEDNN='fast'"):
        KernelSettings.from_env({"GPT2LOAD_ONEDNN": "fast"})


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_batch_of_8_rows_each_equal_their_prompt_alone(model, kind):
    m = quantize_model(copy.deepcopy(model)) if kind == "int8" else model
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 12, 4, 7, 2)]
    idx, mask = left_pad(prompts)
    out = generate(m, idx, 10, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = generate(m, torch.tensor([p]), 10)
        assert out[row, -10:].tolist() == alone[0, -10:].tolist(), row


def test_cache_reorder_moves_only_changed_rows_in_place():
    cfg = GPTConfig(vocab_size=8, context_length=6, emb_dim=4, n_heads=2, n_layers=2)
    cache = KVCache(cfg, 4, 6)
    for t in cache.k + cache.v:
        t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    cache.pos = 3
    before = [t.clone() for t in cache.k + cache.v]
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    index = torch.tensor([1, 0, 2, 1])  # swap two rows, keep one, repeat one
    cache.reorder(index)
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # the same memory
    for old, new in zip(before, cache.k + cache.v, strict=True):
        assert torch.equal(new[:, :, :3], old[index, :, :3])
    cache.reorder(torch.tensor([0, 0]))  # fewer rows: new buffers
    assert cache.k[0].shape[0] == 2


def test_beam_search_is_the_same_whatever_the_kernel(model):
    results = []
    model = copy.deepcopy(model)
    for setting in ("0", "1"):
        with_kernels(model, onednn=setting)
        results.append(beam_search(model, PROMPT[:1], 10, 4, eos_id=None))
    assert torch.equal(results[0].sequences, results[1].sequences)
    torch.testing.assert_close(results[0].scores, results[1].scores, atol=1e-4, rtol=1e-4)
