"""gpt2load's bfloat16 causal attention (attend.c): the same result as attention in float64 up to bfloat16's
rounding, for every shape the model hands it; chosen or forced in a bfloat16 model, and never for float32."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import pair
from test_kernels import WIDE

from gpt2load import Gpt2LoadError, attn, generate, native

BF16 = torch.bfloat16
HERE = native.attend_available()
needs_attend = pytest.mark.skipif(not HERE, reason="attend.c needs a C compiler and an AVX-512 CPU")


@pytest.fixture(scope="module")
def wide16():
    return copy.deepcopy(pair(WIDE, seed=5)[1]).to(BF16)


def operands(B, H, Tq, Tk, D, seed=0):
    """q as the model makes it (a strided view of one fused q/k/v output), k and v as cache slices."""
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Tq, 3, H, D, generator=g)).to(BF16)[:, :, 0].transpose(1, 2)
    k, v = (torch.randn(B, H, Tk + 5, D, generator=g).to(BF16)[:, :, :Tk] for _ in range(2))
    return q, k, v


def float64_attention(q, k, v):
    Tq, Tk = q.shape[2], k.shape[2]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed).transpose(1, 2)


@needs_attend
@pytest.mark.parametrize(
    "B,H,Tq,Tk,D",
    [
        (1, 12, 200, 200, 64),  # a prompt: query blocks of 8, key blocks of 16, one of each left over
        (2, 3, 37, 37, 32),
        (1, 2, 5, 21, 16),  # a chunk after cached positions, an odd number of keys
        (3, 4, 1, 60, 64),  # one new token seeing everything
        (2, 4, 17, 33, 80),  # dimensions past a multiple of 64
        (1, 2, 19, 40, 48),  # several query blocks after an odd number of cached keys; 3 blocks of 16 dimensions
        (1, 1, 9, 9, 112),
        (1, 1, 1, 1, 16),
    ],
)
def test_attend_matches_float64_attention(B, H, Tq, Tk, D):
    q, k, v = operands(B, H, Tq, Tk, D)
    assert native.attend_usable(q, k, v)
    got = native.attend(q, k, v)
    assert got.shape == (B, Tq, H, D) and got.dtype == BF16
    want = float64_attention(q, k, v)
    torch_err = (attn.sdpa_causal(q, k, v).double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= max(2 * torch_err, 1e-2), (err, torch_err)  # as close as torch's bfloat16 attention


@needs_attend
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_attend_keeps_nan_where_it_is_seen(where):
    """A NaN in a query spoils its row; in a key or a value, the rows that see it, and no other (torch's math
    attention spreads it to every row of the head: 0 x NaN)."""
    q, k, v = operands(1, 2, 20, 20, 32)
    {"q": q, "k": k, "v": v}[where][:, 1, 12, 3] = float("nan")
    got = native.attend(q, k, v).isnan().any(-1)  # [B, T, H]
    want = torch.zeros_like(got)
    want[:, 12 : 13 if where == "q" else None, 1] = True
    assert torch.equal(got, want)


def test_attend_refuses_what_it_does_not_take():
    q, k, v = operands(1, 2, 8, 8, 32)
    assert not native.attend_usable(q.float(), k.float(), v.float())
    assert not native.attend_usable(q[..., :24], k[..., :24], v[..., :24])  # not a multiple of 16
    assert not native.attend_usable(k, q[:, :, :4], q[:, :, :4])  # more queries than keys
    assert not native.attend_usable(q, k.transpose(-1, -2), v)  # last dimension not contiguous
    assert not native.attend_usable(q[..., :0], k[..., :0], v[..., :0])


def attention_calls(monkeypatch):
    calls = []
    real = native.attend
    monkeypatch.setattr(native, "attend", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@needs_attend
def test_forced_native_runs_in_a_bfloat16_model(wide16, monkeypatch):
    calls = attention_calls(monkeypatch)
    prompt = torch.randint(0, WIDE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = {}
    for setting in ("native", "sdpa"):
        monkeypatch.setenv("GPT2LOAD_ATTENTION", setting)
        with torch.inference_mode():
            cache = wide16.new_cache(2, 32)
            first = wide16(prompt[:, :12], cache=cache)  # a prompt, then a chunk after it, then one token
            logits[setting] = torch.cat(
                [first, wide16(prompt[:, 12:19], cache=cache), wide16(prompt[:, 19:], cache=cache)], 1
            )
    assert [s[2] for s in calls] == [12] * WIDE.n_layers + [7] * WIDE.n_layers + [1] * WIDE.n_layers
    torch.testing.assert_close(logits["native"].float(), logits["sdpa"].float(), atol=0.1, rtol=0.05)
    calls.clear()
    monkeypatch.setenv("GPT2LOAD_ATTENTION", "native")
    generate(copy.deepcopy(wide16).float(), prompt, 3)  # float32 never takes it
    assert not calls


@needs_attend
def test_measured_choice_decodes_as_torch_attention(wide16, monkeypatch):
    prompt = torch.randint(0, WIDE.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    attn._chosen.clear()
    calls = attention_calls(monkeypatch)
    with torch.inference_mode():
        auto = wide16(prompt).float()
    assert list(attn._chosen) and calls  # measured: gpt2load's attention ran and was compared
    monkeypatch.setenv("GPT2LOAD_ATTENTION", "sdpa")
    with torch.inference_mode():
        torch.testing.assert_close(auto, wide16(prompt).float(), atol=0.1, rtol=0.05)


def test_attention_settings_that_cannot_hold_name_the_variables(wide16, monkeypatch):
    monkeypatch.setenv("GPT2LOAD_ATTENTION", "flash")
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_ATTENTION='flash'"):
        generate(wide16, torch.tensor([[1, 2, 3]]), 2)
    monkeypatch.setenv("GPT2LOAD_ATTENTION", "native")
    monkeypatch.setenv("GPT2LOAD_NATIVE", "0")
    with pytest.raises(Gpt2LoadError, match="contradicts GPT2LOAD_NATIVE=0"):
        generate(wide16, torch.tensor([[1, 2, 3]]), 2)
    monkeypatch.setenv("GPT2LOAD_NATIVE", "auto")
    monkeypatch.setenv("GPT2LOAD_ATTENTION", "sdpa")
    calls = attention_calls(monkeypatch)
    generate(wide16, torch.tensor([[1, 2, 3]]), 2)
    assert not calls
