"""gpt2load's attention kernels (attend.c): bfloat16 causal attention, the same result as attention in float64 up
to bfloat16's rounding for every shape the model hands it, chosen or forced in a bfloat16 model and never for
float32 prompts; and float32 decoding (one query per row, with or without a mask), close to float64 attention
and decoding the same tokens as torch's attention."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import pair, with_kernels
from test_kernels import WIDE

from gpt2load import Gpt2LoadError, beam_search, generate, left_pad
from gpt2load.fast import attn, native
from gpt2load.settings import KernelSettings

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


def kernel_calls(monkeypatch, name="attend"):
    """The query shapes `native.<name>` is called with from now on (it still runs)."""
    calls = []
    real = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@needs_attend
def test_forced_native_runs_in_a_bfloat16_model(wide16, monkeypatch):
    calls = kernel_calls(monkeypatch)
    prompt = torch.randint(0, WIDE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    logits = {}
    for setting in ("native", "sdpa"):
        with_kernels(wide16, attention=setting, block="0")  # attention by the module, not block.c
        with torch.inference_mode():
            cache = wide16.new_cache(2, 32)
            first = wide16(prompt[:, :12], cache=cache)  # a prompt, then a chunk after it, then one token
            logits[setting] = torch.cat(
                [first, wide16(prompt[:, 12:19], cache=cache), wide16(prompt[:, 19:], cache=cache)], 1
            )
    assert [s[2] for s in calls] == [12] * WIDE.n_layers + [7] * WIDE.n_layers + [1] * WIDE.n_layers
    torch.testing.assert_close(logits["native"].float(), logits["sdpa"].float(), atol=0.1, rtol=0.05)
    calls.clear()
    float32 = copy.deepcopy(wide16).float()
    with_kernels(float32, attention="native")
    generate(float32, prompt, 3)  # float32 prompts never take it
    assert not calls


@needs_attend
def test_measured_choice_decodes_as_torch_attention(wide16, monkeypatch):
    prompt = torch.randint(0, WIDE.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    kernels = with_kernels(wide16)
    calls = kernel_calls(monkeypatch)
    with torch.inference_mode():
        auto = wide16(prompt).float()
    assert list(kernels.attention_choices) and calls  # measured: gpt2load's attention ran and was compared
    with_kernels(wide16, attention="sdpa")
    with torch.inference_mode():
        torch.testing.assert_close(auto, wide16(prompt).float(), atol=0.1, rtol=0.05)


def test_attention_settings_that_cannot_hold_name_the_variables(wide16, monkeypatch):
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_ATTENTION='flash'"):
        KernelSettings.from_env({"GPT2LOAD_ATTENTION": "flash"})
    with pytest.raises(Gpt2LoadError, match="contradicts GPT2LOAD_NATIVE=0"):
        KernelSettings.from_env({"GPT2LOAD_ATTENTION": "native", "GPT2LOAD_NATIVE": "0"})
    with_kernels(wide16, attention="sdpa")
    calls = kernel_calls(monkeypatch)
    generate(wide16, torch.tensor([[1, 2, 3]]), 2)
    assert not calls


def decoding_operands(B, H, Tk, D, seed=0):
    """One float32 query per row as the model makes it (a strided view), keys and values as cache slices."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, 3, H, D, generator=g)[:, :, 0].transpose(1, 2)
    k, v = (torch.randn(B, H, Tk + 7, D, generator=g)[:, :, :Tk] for _ in range(2))
    return q, k, v


def left_pad_mask(B, Tk, width=None):
    """Row b sees keys from b % 5 on, as a slice of a wider table (the decoder's layout)."""
    keep = torch.arange(width or Tk + 3)[None, :] >= (torch.arange(B) % 5)[:, None]
    return keep[:, None, None, :Tk]


@needs_attend
@pytest.mark.parametrize("B,H,Tk,D", [(8, 12, 60, 64), (3, 4, 17, 32), (2, 3, 33, 48), (1, 2, 1, 16), (4, 2, 16, 256)])
@pytest.mark.parametrize("masking", ["none", "left pad", "per head", "broadcast"])
def test_attend_one_matches_float64_attention(B, H, Tk, D, masking):
    q, k, v = decoding_operands(B, H, Tk, D, seed=B + Tk)
    g = torch.Generator().manual_seed(1)
    mask = {
        "none": None,
        "left pad": left_pad_mask(B, Tk),
        "per head": torch.rand(B, H, 1, Tk, generator=g) < 0.7,
        "broadcast": left_pad_mask(1, Tk),
    }[masking]
    if mask is not None:
        mask[..., -1] = True  # every row sees its newest key
    assert native.attend_one_usable(q, k, v, mask)
    got = native.attend_one(q, k, v, mask)
    assert got.shape == (B, 1, H, D) and got.dtype == torch.float32
    allowed = None if mask is None else mask.expand(B, H, 1, Tk)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed).transpose(1, 2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@needs_attend
def test_attend_one_keeps_nan_where_it_is_seen_and_zeros_for_no_key():
    q, k, v = decoding_operands(3, 2, 10, 16)
    mask = left_pad_mask(3, 10)  # rows 1 and 2 do not see key 0
    v[:, :, 0, 5] = float("nan")
    k[2, 1, 6, 0] = float("nan")
    got = native.attend_one(q, k, v, mask)
    assert got[0, 0, :, 5].isnan().all() and not got[0, 0, :, :5].isnan().any()  # row 0 sees it, both heads
    assert not got[1].isnan().any()  # row 1 sees neither
    assert got[2, 0, 1].isnan().all() and not got[2, 0, 0].isnan().any()  # the NaN key: its head only
    mask = mask.clone()
    mask[1] = False  # a row that sees no key: zeros, as torch's attention gives
    got = native.attend_one(q, k, v, mask)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    v = v.nan_to_num()  # (torch's spreads a NaN value even there: 0 x NaN)
    torch.testing.assert_close(got[1], F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)[1])


def test_attend_one_refuses_what_it_does_not_take():
    q, k, v = decoding_operands(2, 2, 8, 32)
    mask = left_pad_mask(2, 8)
    assert not native.attend_one_usable(q.to(BF16), k.to(BF16), v.to(BF16), None)  # bfloat16: attend
    assert not native.attend_one_usable(k[:, :, :2], k, v, None)  # two queries
    assert not native.attend_one_usable(q[..., :24], k[..., :24], v[..., :24], None)  # not a multiple of 16
    assert not native.attend_one_usable(q, k, v, mask.float())  # an additive mask: torch's
    assert not native.attend_one_usable(q, k, v, mask[..., :7])  # another number of keys
    assert not native.attend_one_usable(q, k, v, torch.ones(2, 1, 1, 16, dtype=torch.bool)[..., ::2])  # strided


@needs_attend
@pytest.mark.parametrize("setting", ["native", "auto"])
def test_float32_decoding_takes_attend_one_with_the_same_tokens(setting, monkeypatch):
    model = pair(WIDE, seed=5)[1]
    idx, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]])
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    with_kernels(model, attention=setting, block="0")  # decoding steps by the modules, not block.c
    calls = kernel_calls(monkeypatch, "attend_one")
    batch, alone, beams = (
        generate(model, idx, 10, attention_mask=mask),
        generate(model, prompt, 10),
        beam_search(model, prompt, 8, 3, eos_id=None).sequences,
    )
    assert {c[0] for c in calls} == {3, 1}  # measured (auto): compared for each bucket at least
    if setting == "native":  # every decoding step of all three (9, 9 and 7 after the prompts), every layer
        assert len(calls) >= (9 + 9 + 7) * WIDE.n_layers
    with_kernels(model, attention="sdpa")
    calls.clear()
    assert torch.equal(batch, generate(model, idx, 10, attention_mask=mask))
    assert torch.equal(alone, generate(model, prompt, 10))
    assert torch.equal(beams, beam_search(model, prompt, 8, 3, eos_id=None).sequences)
    assert not calls
