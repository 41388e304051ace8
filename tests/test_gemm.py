"""gpt2load's bfloat16 matrix-matrix kernel for prompts (gemm.c): the products of F.linear, with the bias and GELU,
up to bfloat16's rounding, for every tile and panel edge; the same bits at any thread count; chosen or forced for
a bfloat16 model's prompts, never for float32 or for a few rows."""

import copy

import pytest
import torch
import torch.nn.functional as F
from oracle import pair, with_kernels
from test_kernels import WIDE

from gpt2load.fast import native
from gpt2load.fast.registry import Kernels
from gpt2load.settings import KernelSettings

BF16 = torch.bfloat16
HERE = native.gemm_usable(torch.zeros(17, 2, dtype=BF16), torch.zeros(16, 2, dtype=BF16))
needs_gemm = pytest.mark.skipif(not HERE, reason="gemm.c needs a C compiler and a CPU with AVX512-BF16")


def operands(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(BF16)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(BF16)
    return x, w, torch.randn(N, generator=g).to(BF16)


def float64_linear(x, w, b, gelu):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    return F.gelu(y, approximate="tanh") if gelu else y


@needs_gemm
@pytest.mark.parametrize(
    "M, N, K",
    [
        (17, 16, 2),  # one pair of k, one vector of outputs
        (23, 48, 34),  # a panel of 3 vectors; 17 pairs: one transposed block of 16 and one left over
        (61, 128, 30),  # two whole panels; fewer pairs than a block
        (100, 80, 66),  # a whole panel and one of a single vector
        (300, 144, 768),  # many tiles of 6 rows and a last one of 2
        (3, 32, 8),  # fewer rows than a tile (gemm itself takes any count; linear sends these to gemv)
    ],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_gemm_matches_a_float64_matmul(M, N, K, bias, gelu):
    x, w, b = operands(M, N, K, seed=M + N + K)
    b = b if bias else None
    got = native.gemm(x, w, b, gelu)
    assert got.dtype == BF16 and got.shape == (M, N)
    want = float64_linear(x, w, b, gelu)
    torch.testing.assert_close(got.double(), want.to(BF16).double(), atol=1e-2, rtol=1e-2)  # one rounding each


@needs_gemm
def test_gemm_gives_the_same_bits_at_any_thread_count():
    x, w, b = operands(50, 208, 96, seed=2)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(native.gemm(x, w, b, True))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # each output is one thread's sum


@needs_gemm
def test_gemm_keeps_nan_and_infinity_in_their_rows():
    x, w, b = operands(20, 32, 16, seed=3)
    x[4, 5] = float("nan")
    x[9, 0] = float("inf")
    for gelu in (False, True):
        y = native.gemm(x, w, b, gelu)
        assert y[4].isnan().all()
        assert not y[9].isfinite().all()  # inf times weights of both signs: infinities and NaN
        others = [i for i in range(20) if i not in (4, 9)]
        assert y[others].isfinite().all()
    big = torch.full((17, 2), 200.0, dtype=BF16)  # GELU of large sums: v, and 0 (not NaN) far below
    y = native.gemm(torch.cat([big, -big]), torch.ones(16, 2, dtype=BF16), None, True)
    assert (y[:17] == 400).all() and (y[17:] == 0).all()


def test_gemm_refuses_what_it_does_not_take():
    x, w, _ = operands(20, 32, 16)
    assert not native.gemm_usable(x.float(), w.float())  # float32: torch's kernels
    assert not native.gemm_usable(x[:16], w)  # a few rows: gemv.c
    assert not native.gemm_usable(x, w[:24])  # outputs not a multiple of 16
    assert not native.gemm_usable(x[:, :15], w[:, :15].contiguous())  # odd inputs
    assert not native.gemm_usable(x, w.t().contiguous().t())  # a transposed weight
    for args in ((x, w[:24], None), (x[:, :15], w[:, :15], None), (x, w, torch.zeros(5, dtype=BF16))):
        with pytest.raises(ValueError, match="gemm: shapes do not fit"):
            native.gemm(*args)
    with pytest.raises(ValueError, match="must be bfloat16"):
        native.gemm(x.float(), w, None)


@needs_gemm
def test_gemm_takes_no_rows_and_a_weight_at_an_odd_address():
    x, w, b = operands(20, 32, 18)
    assert native.gemm(x[:0], w, b).shape == (0, 32)
    odd = torch.empty(32 * 18 + 1, dtype=BF16)[1:].view(32, 18)  # 2-byte aligned only; 9 pairs: the scalar tail
    odd.copy_(w)
    assert odd.data_ptr() % 4 == 2
    assert torch.equal(native.gemm(x, odd, b), native.gemm(x, w, b))  # the same kernel on the same values


def test_native_off_never_takes_gemm(monkeypatch):
    x, w, b = operands(20, 32, 16)
    calls = gemm_calls(monkeypatch)
    with torch.inference_mode():
        Kernels(KernelSettings(native="0")).linear(x, w, b)
    assert not calls


def gemm_calls(monkeypatch):
    calls = []
    real = native.gemm
    monkeypatch.setattr(native, "gemm", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    return calls


@needs_gemm
def test_forced_native_runs_gemm_for_a_bfloat16_prompt(monkeypatch):
    model = copy.deepcopy(pair(WIDE, seed=5)[1]).to(BF16)
    prompt = torch.randint(0, WIDE.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    calls = gemm_calls(monkeypatch)
    logits = {}
    for setting in ("native", "plain"):
        with_kernels(model, matmul=setting)
        with torch.inference_mode():
            logits[setting] = model(prompt).float()
    # every block's 4 matmuls on 40 rows; the head (257 outputs, not a multiple of 16) goes to F.linear
    d = WIDE.emb_dim  # q/k/v, the projection, the first and the second feed-forward matmul
    assert calls == [(40, d), (40, d), (40, d), (40, 4 * d)] * WIDE.n_layers
    torch.testing.assert_close(logits["native"], logits["plain"], atol=0.1, rtol=0.05)  # bf16 rounding in each
    calls.clear()
    float32 = copy.deepcopy(model).float()
    with_kernels(float32, matmul="native")
    with torch.inference_mode():
        float32(prompt)  # float32 never takes it
    assert not calls


@needs_gemm
def test_measured_choice_includes_gemm(monkeypatch):
    x, w, b = operands(64, 96, 128, seed=4)
    calls = gemm_calls(monkeypatch)
    with torch.inference_mode():
        got = Kernels().linear(x, w, b, gelu=True)
    assert calls  # measured against the others
    torch.testing.assert_close(got.double(), float64_linear(x, w, b, True).to(BF16).double(), atol=2e-2, rtol=2e-2)
