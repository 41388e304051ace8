"""gpt2load's own matrix-vector kernel (gemv.c): the same products as F.linear for every weight dtype, row count and
odd width, built once per machine into the cache folder (never half-written), and a clear error where it cannot."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from oracle import pair, with_kernels
from test_kernels import WIDE, plain_greedy

from gpt2load import Gpt2LoadError, beam_search, generate, left_pad
from gpt2load.fast import attn, kernels, native
from gpt2load.fast.registry import Kernels
from gpt2load.model.quant import quantize_model, quantize_weight
from gpt2load.settings import KernelSettings


@pytest.fixture(scope="module")
def wide():
    return pair(WIDE, seed=5)[1]


def reference(x, w, b, scale=None):
    """In float64, from the very values the kernel reads."""
    w = w.double() * (scale.double()[:, None] if scale is not None else 1)
    return F.linear(x.double(), w, None if b is None else b.double())


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("width", [96, 100, 7])  # whole vectors; a tail past the last vector; less than one
@pytest.mark.parametrize("wdtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("xdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("outs", [37, 2, 1])  # weight rows in pairs, and one left over; a single pair; one row
def test_gemv_matches_a_float64_matmul(rows, width, wdtype, xdtype, bias, outs):
    g = torch.Generator().manual_seed(rows * 1000 + width)
    xd, wd = getattr(torch, xdtype), getattr(torch, wdtype)
    x = torch.randn(rows, width, generator=g).to(xd)
    w = torch.randn(outs, width, generator=g)
    scale = None
    if wd == torch.int8:
        w, scale = quantize_weight(w)
    else:
        w = w.to(wd)
    b = torch.randn(outs, generator=g).to(xd) if bias else None
    assert native.usable(x, w)
    got = native.gemv(x, w, b, scale)
    assert got.dtype == xd and got.shape == (rows, outs)
    want = reference(x, w, b, scale)
    tol = 1e-5 if xd == torch.float32 else 1e-2  # float32 sums in another order; bfloat16's rounding of the result
    torch.testing.assert_close(got.double(), want.to(xd).double(), atol=tol, rtol=tol)


def test_gemv_reads_strided_inputs_and_keeps_nan():
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 64, generator=g), torch.randn(40, 32, generator=g), torch.randn(80, generator=g)
    x = x[:, ::2]  # not contiguous: copied in
    got = native.gemv(x, w, b[::2])
    torch.testing.assert_close(got.double(), reference(x, w, b[::2]), atol=1e-5, rtol=1e-5)
    x = x.contiguous()
    x[1, 3] = float("nan")
    got = native.gemv(x, w, None)
    assert got[1].isnan().all() and not got[[0, 2, 3]].isnan().any()
    assert native.gemv(x.bfloat16(), w.bfloat16(), None)[1].isnan().all()


def test_forced_native_decodes_the_plain_tokens_and_really_runs(wide):
    wide = copy.deepcopy(wide)
    forced = with_kernels(wide, matmul="native")
    prompt = torch.randint(0, WIDE.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(wide, prompt, 12), plain_greedy(wide, prompt, 12))
    idx, mask = left_pad([prompt[0, 2:].tolist(), prompt[1].tolist()])
    out = generate(wide, idx, 8, attention_mask=mask)
    assert torch.equal(out[0, -8:], generate(wide, prompt[:1, 2:], 8)[0, -8:])
    beams = beam_search(wide, prompt[:1], 8, 3, eos_id=None)
    # every matmul above had at most 16 rows: all of them ran gemv.c
    assert {getattr(fn, "kernel", fn) for fn in forced.linear_choices.values()} == {kernels._native}
    with_kernels(wide, matmul="plain")
    plain = beam_search(wide, prompt[:1], 8, 3, eos_id=None)
    assert torch.equal(beams.sequences, plain.sequences)
    torch.testing.assert_close(beams.scores, plain.scores, atol=1e-4, rtol=1e-4)


def test_bfloat16_and_int8_models_run_gemv_when_forced(wide):
    prompt = torch.randint(0, WIDE.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    bf16 = copy.deepcopy(wide).to(torch.bfloat16)
    forced = with_kernels(bf16, matmul="native")
    with torch.inference_mode():
        got = bf16(prompt).float()
    assert {getattr(fn, "kernel", fn) for fn in forced.linear_choices.values()} == {kernels._native}
    with_kernels(bf16, matmul="plain")
    with torch.inference_mode():
        torch.testing.assert_close(got, bf16(prompt).float(), atol=0.1, rtol=0.05)  # bf16 rounding in each
    q = quantize_model(copy.deepcopy(wide))
    forced = with_kernels(q, matmul="native")
    out = generate(q, prompt, 8)
    assert {fn.__name__ for fn in forced.int8_choices.values()} == {"int8native"}
    with_kernels(q, matmul="plain", int8pack=False)  # dequantized weights through F.linear
    assert torch.equal(out, generate(q, prompt, 8))


def test_native_settings_that_cannot_hold_name_the_variables():
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_NATIVE='yes'"):
        KernelSettings.from_env({"GPT2LOAD_NATIVE": "yes"})
    with pytest.raises(Gpt2LoadError, match="contradicts GPT2LOAD_NATIVE=0"):
        KernelSettings.from_env({"GPT2LOAD_NATIVE": "0", "GPT2LOAD_MATMUL": "native"})


def test_native_off_is_never_used(wide, monkeypatch):
    wide = copy.deepcopy(wide)
    off = with_kernels(wide, native="0")
    calls = []
    for name in ("gemv", "gemm", "attend", "attend_one", "usable", "gemm_usable"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    generate(wide, torch.tensor([[1, 2, 3]]), 4)
    generate(copy.deepcopy(wide).bfloat16(), torch.tensor([[1, 2, 3]]), 4)
    assert kernels._native not in {getattr(fn, "kernel", fn) for fn in off.linear_choices.values()}
    assert not calls  # not even asked


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache folder and no library loaded yet; the process's library is back afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


def test_the_build_lands_whole_in_the_cache_folder(fresh_build):
    assert native.available()
    built = sorted(p.name for p in (fresh_build / "cache" / "gpt2load" / "native").iterdir())
    assert len(built) == 2 and built[0].startswith("kernels-") and built[0].endswith(".so")  # no partial file left
    assert built[1] == built[0] + ".sha256"  # the library's digest, checked before each load
    x, w = torch.randn(2, 16), torch.randn(5, 16)
    torch.testing.assert_close(native.gemv(x, w, None).double(), reference(x, w, None), atol=1e-5, rtol=1e-5)


def test_a_failed_build_leaves_no_file_and_forcing_says_why(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    assert not native.available()
    assert "building gemv.c, gemm.c, attend.c, block.c failed" in native.why_unavailable()
    assert not list((fresh_build / "cache").rglob("*.so*")) and not list((fresh_build / "tmp").rglob("*.so*"))
    monkeypatch.setenv("CC", str(fresh_build / "no-such-compiler"))
    native._library.cache_clear()
    assert "no C compiler" in native.why_unavailable()
    x, w = torch.randn(1, 16), torch.randn(5, 16)
    with torch.inference_mode():
        auto = Kernels()
        torch.testing.assert_close(auto.linear(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)  # others work
        with pytest.raises(Gpt2LoadError, match="GPT2LOAD_MATMUL=native, but gpt2load's kernel is unavailable"):
            Kernels(KernelSettings(matmul="native")).linear(x, w, None)
        q = torch.zeros(1, 1, 3, 16, dtype=torch.bfloat16)
        torch.testing.assert_close(auto.attention(q, q, q), attn.sdpa_causal(q, q, q))  # torch's attention
        with pytest.raises(Gpt2LoadError, match="GPT2LOAD_ATTENTION=native, but gpt2load's attention is unavailable"):
            Kernels(KernelSettings(attention="native")).attention(q, q, q)


def test_gemv_refuses_shapes_that_do_not_fit():
    x, w = torch.randn(1, 40), torch.randn(2, 16)
    assert not native.usable(x, w)
    for args in ((x, w, None), (x[:, :16], w, torch.randn(1)), (x[:, :16], w.to(torch.int8), None, torch.ones(3))):
        with pytest.raises(ValueError, match="gemv: shapes do not fit"):
            native.gemv(*args)


def test_the_library_is_private_to_its_user(fresh_build):
    """Code we load must be writable by us only: a loose folder of ours is tightened, a loose library rebuilt."""
    folder = fresh_build / "cache" / "gpt2load" / "native"
    folder.mkdir(parents=True)
    folder.chmod(0o777)  # as made under a permissive umask
    assert native.available()
    assert folder.stat().st_mode & 0o777 == 0o700
    (lib,) = folder.glob("*.so")
    assert not lib.stat().st_mode & 0o022
    lib.chmod(0o777)
    native._library.cache_clear()
    assert native.available() and lib.stat().st_mode & 0o777 == 0o755  # rebuilt in place


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder of another user needs root")
def test_a_library_folder_of_another_user_is_not_used(fresh_build):
    """Someone else's folder (as one made first in a shared /tmp) would run their code: built elsewhere."""
    theirs = fresh_build / "cache" / "gpt2load" / "native"
    theirs.mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    assert native.available()
    assert not list(theirs.iterdir())  # built in the private temporary folder instead
    assert len(list((fresh_build / "tmp").rglob("kernels-*.so"))) == 1
    native._library.cache_clear()
    os.chown(fresh_build / "tmp" / f"gpt2load-native-{os.getuid()}", 65534, 65534)
    assert not native.available() and "belongs to another user" in native.why_unavailable()
