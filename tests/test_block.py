"""A decoding step's block in one call (block.c through fast/fused.py): the same logits as the modules one by one
for float32, bfloat16 and int8 weights, batches with masks, beams, odd widths and head sizes; the same bits at any
thread count; not used where a module is not gpt2load's own; and each of its vector paths (AVX-512, AVX2, plain
C) built and checked on this machine where the CPU can run it."""

import copy
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from oracle import pair, with_kernels

from gpt2load import beam_search, generate, left_pad
from gpt2load.fast import native
from gpt2load.model.config import GPTConfig
from gpt2load.model.quant import quantize_model

pytestmark = pytest.mark.skipif(not native.available(), reason="gpt2load's C kernels do not build here")

SHAPES = {
    "hd16": GPTConfig(vocab_size=101, context_length=48, emb_dim=64, n_heads=4, n_layers=2),
    "hd8-odd": GPTConfig(vocab_size=97, context_length=48, emb_dim=40, n_heads=5, n_layers=2),  # tails everywhere
}


def as_kind(model, kind):
    m = copy.deepcopy(model)
    return m.to(torch.bfloat16) if kind == "bf16" else quantize_model(m) if kind == "int8" else m


def decode_logits(model, idx, steps, mask=None):
    """Logits of `steps` greedy decoding steps after the prompt, [steps, B, vocab] float32, and the tokens; with a
    left-padding `mask`, the masks and positions gpt2load's decoder gives (pads see themselves only)."""
    with torch.inference_mode():
        cache = model.new_cache(idx.shape[0], idx.shape[1] + steps)
        kw, step_kw = {}, {}
        if mask is not None:
            real, T = mask.bool(), idx.shape[1]
            causal, eye = torch.ones(T, T, dtype=torch.bool).tril(), torch.eye(T, dtype=torch.bool)
            kw = {
                "attn_mask": ((causal & real[:, None, :]) | eye)[:, None],
                "pos_ids": (real.cumsum(1) - 1).clamp(min=0),
            }
            npos = real.sum(1)
        out = model(idx, cache, last_only=True, **kw)
        logits, toks = [], []
        for _ in range(steps):
            t = out[:, -1].argmax(-1, keepdim=True)
            toks.append(t)
            if mask is not None:
                real = torch.cat([real, torch.ones_like(t, dtype=torch.bool)], 1)
                step_kw = {"attn_mask": real[:, None, None, :], "pos_ids": npos[:, None]}
                npos = npos + 1
            out = model(t, cache, **step_kw)
            logits.append(out[:, -1].float())
    return torch.stack(logits), torch.cat(toks, 1)


def both(model, kind):
    """The model in `kind` twice: with block.c (and its Kernels, to count calls) and with the modules one by one
    through gpt2load's own matmul kernel (the same row kernels, so float32 and int8 agree closely)."""
    ours = as_kind(model, kind)
    with_kernels(ours, matmul="native")
    ref = copy.deepcopy(ours)
    with_kernels(ref, matmul="native", block="0")
    return ours, ours.backend.blocks, ref


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3])
def test_same_logits_as_the_modules(shape, kind, rows):
    cfg = SHAPES[shape]
    model = pair(cfg, seed=3)[1]
    ours, blocks, ref = both(model, kind)
    idx = torch.randint(0, cfg.vocab_size, (rows, 7), generator=torch.Generator().manual_seed(rows))
    got, got_toks = decode_logits(ours, idx, 12)
    want, want_toks = decode_logits(ref, idx, 12)
    assert blocks.calls == 12 * cfg.n_layers, "block.c did not run every decoding step"
    scale = want.abs().max().item()
    if kind == "bf16":
        # block.c keeps float32 between operations where the modules round to bfloat16 after each: compare both
        # with the float32 model, block.c no further from it than the modules are (plus one rounding).
        exact, _ = decode_logits(model, idx, 12)
        assert (got - exact).abs().max() <= 1.5 * (want - exact).abs().max() + 0.02 * scale
    else:
        torch.testing.assert_close(got, want, atol=2e-5 * scale, rtol=1e-4)
        assert torch.equal(got_toks, want_toks)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_left_padded_batch_and_beams(kind):
    cfg = SHAPES["hd16"]
    model = pair(cfg, seed=4)[1]
    ours, blocks, ref = both(model, kind)
    g = torch.Generator().manual_seed(9)
    idx, mask = left_pad([torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (2, 9, 5, 1)], pad_id=0)
    got, got_toks = decode_logits(ours, idx, 10, mask)
    want, want_toks = decode_logits(ref, idx, 10, mask)
    assert blocks.calls > 0
    torch.testing.assert_close(got, want, atol=2e-5 * want.abs().max().item(), rtol=1e-4)
    assert torch.equal(generate(ours, idx, 10, attention_mask=mask), generate(ref, idx, 10, attention_mask=mask))
    prompt = idx[1:2, -9:]
    a = beam_search(ours, prompt, 8, 4, eos_id=None)
    b = beam_search(ref, prompt, 8, 4, eos_id=None)
    assert torch.equal(a.sequences, b.sequences)


def test_same_bits_at_any_thread_count():
    """Each output is one thread's sum and the LayerNorms and each row and head's softmax one thread's: the thread
    count only moves work between threads."""
    for kind in ("fp32", "bf16", "int8"):
        prepared, dtype = prepared_block(kind)
        outs = [call_block(native.block, prepared, dtype, threads) for threads in (1, 2, 3)]
        for other in outs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def test_a_hooked_or_replaced_module_runs_as_it_is():
    cfg = SHAPES["hd16"]
    model = pair(cfg, seed=6)[1]
    idx = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    hooked = copy.deepcopy(model)
    with_kernels(hooked, matmul="native")
    seen = []
    hooked.trf_blocks[1].ff.layers[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    generate(hooked, idx, 4)
    assert hooked.backend.blocks.calls == 3 and len(seen) == 4  # prompt + 3 steps: block 0 by block.c, block 1 hooked
    off = copy.deepcopy(model)
    with_kernels(off, matmul="native", block="0")
    generate(off, idx, 4)
    assert off.backend.blocks is None


def test_the_cache_limit_is_the_modules_error():
    cfg = SHAPES["hd16"]
    model = pair(cfg, seed=7)[1]
    with_kernels(model, matmul="native")
    with torch.inference_mode():
        cache = model.new_cache(1, 4)
        model(torch.tensor([[1, 2, 3, 4]]), cache)
        with pytest.raises(ValueError, match="KV cache holds 4 positions"):
            model(torch.tensor([[5]]), cache)


CSRC = Path(native.__file__).parent / "csrc"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


ARCHES = {  # the vector path each -march selects in rowdot.h, and the CPU flags it needs
    "avx512": ("-march=x86-64-v4", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    "avx2": ("-march=x86-64-v3", {"avx2", "fma", "f16c", "bmi2"}),
    "plain": ("-march=x86-64", set()),
}


def prepared_block(kind):
    """block.c's parameters for the first block of a model of odd widths (vector tails everywhere), and its dtype."""
    cfg = SHAPES["hd8-odd"]
    model = as_kind(pair(cfg, seed=8)[1], kind)
    with_kernels(model, matmul="native")
    block = model.trf_blocks[0]
    dtype = model.pos_emb.weight.dtype
    prepared = model.backend.blocks._prepare(block, lambda: model.backend._stacked_qkv(block.att), dtype)
    prepared.model = model  # keeps the weights it points into alive
    return prepared, dtype


def call_block(fn, prepared, dtype, threads):
    """One step of 3 rows at position 5 (a random mask) through `fn`: the output and the cache entries written."""
    cfg = SHAPES["hd8-odd"]
    g = torch.Generator().manual_seed(1)
    B, H, hd, pos = 3, cfg.n_heads, cfg.emb_dim // cfg.n_heads, 5
    x = torch.randn(B, 1, cfg.emb_dim, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, pos + 1, generator=g) > 0.3
    k = torch.randn(B, H, 8, hd, generator=g).to(dtype)
    v = torch.randn(B, H, 8, hd, generator=g).to(dtype)
    y = torch.empty_like(x)
    strides = (ctypes.c_int64 * 3)(*k.stride()[:3])
    ms = (ctypes.c_int64 * 2)(mask.stride(0), 0)
    args = (ctypes.byref(prepared.params), 1 if dtype is torch.bfloat16 else 0, x.data_ptr(), y.data_ptr(), B)
    args += (k.data_ptr(), v.data_ptr(), strides, pos, mask.data_ptr(), ms, threads)
    assert fn(*args) == 0
    return y.float(), k[:, :, pos].float(), v[:, :, pos].float()


@pytest.mark.parametrize("arch", list(ARCHES))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_each_vector_path_on_this_machine(arch, kind, tmp_path):
    """block.c built for AVX-512, AVX2 and plain C in turn (each where this CPU runs it), called with the very
    parameters the library in use gets: the same outputs and cache writes as the library built for this CPU."""
    flag, needs = ARCHES[arch]
    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU lacks {', '.join(sorted(needs - _cpu_flags()))} for the {arch} path")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no cc or gcc to build the other vector paths with")
    lib_path = tmp_path / f"block-{arch}.so"
    cmd = [cc, "-O2", flag, "-fopenmp", "-shared", "-fPIC", "-o", str(lib_path), str(CSRC / "block.c")]
    subprocess.run(cmd, check=True, capture_output=True)
    fn = ctypes.CDLL(str(lib_path)).gpt2load_block
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    prepared, dtype = prepared_block(kind)
    tol = 2e-2 if kind == "bf16" else 1e-4
    for want, got in zip(call_block(native.block, prepared, dtype, 2), call_block(fn, prepared, dtype, 2), strict=True):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
