"""int8 weight-only quantization: the modules swapped, fidelity to float32, saved and loaded as int8, refused
where float weights are needed (training, transformers and book exports)."""

import copy

import pytest
import torch
from helpers import assert_clean_error, run_cli
from oracle import TINY, pair, with_kernels
from torch import nn

from gpt2load import Gpt2LoadError, export, export_gguf, generate, load_gpt2, save_model, train
from gpt2load.formats.stfile import read_header
from gpt2load.model.quant import (
    Int8Embedding,
    Int8Linear,
    dequantize_model,
    fidelity,
    quantization,
    quantize_model,
    quantize_weight,
)

# The bounds the bench also reports on a 512-token text of the 124M shape.
MIN_TOP1_AGREEMENT = 0.98
MAX_MEAN_KL = 0.02


@pytest.fixture(scope="module")
def models():
    _, fp32 = pair(TINY, seed=3)
    return fp32, quantize_model(copy.deepcopy(fp32))


def text(n=TINY.context_length, seed=0):
    return torch.randint(0, TINY.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_every_linear_and_the_head_become_int8(models):
    fp32, q = models
    assert quantization(q) == "int8" and quantization(fp32) is None
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert isinstance(q.out_head, Int8Linear) and q.out_head.qweight.dtype == torch.int8
    # the tied head and the token embedding share one int8 matrix; the position embedding stays float
    assert isinstance(q.tok_emb, Int8Embedding) and q.head_tied
    assert q.out_head.qweight is q.tok_emb.qweight and q.out_head.weight_scale is q.tok_emb.weight_scale
    assert q.pos_emb.weight.dtype == torch.float32 and torch.equal(q.pos_emb.weight, fp32.pos_emb.weight)
    idx = text(7)
    with torch.inference_mode():  # a lookup is the dequantized row: within half a step of the float row
        got, want = q.tok_emb(idx), fp32.tok_emb(idx)
    step = q.tok_emb.weight_scale[idx][..., None]
    assert got.dtype == torch.float32 and bool(((got - want).abs() <= step / 2 + 1e-6).all())
    float_bytes = sum(t.numel() * t.element_size() for t in fp32.parameters())
    int8_bytes = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert int8_bytes < float_bytes  # (the tiny model is mostly embedding: the 124M ratio is in the bench)


def test_quantize_weight_is_per_output_channel_and_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    q, s = quantize_weight(w)
    assert s.tolist() == pytest.approx([1 / 127, 1.0, 2.0])
    assert q[0].tolist() == [127, -64, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [-127, 64, 0]
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-6).all())


INT8_KERNELS = {  # torch's int8 kernel (bf16 compute), gpt2load's (gemv.c), dequantize + F.linear
    "pack": {"matmul": "plain", "int8pack": True},
    "native": {"matmul": "native"},
    "exact": {"int8pack": False, "native": "0"},
}


def use_int8_kernel(model, kernel):
    """A copy of `model` computing with `kernel` (the fixture's model keeps its own backend)."""
    model = copy.deepcopy(model)
    with_kernels(model, **INT8_KERNELS[kernel])
    return model


@pytest.mark.parametrize("kernel", list(INT8_KERNELS))
def test_fidelity_to_float32_within_the_stated_bounds(models, kernel):
    fp32, q = models
    q = use_int8_kernel(q, kernel)
    idx = text(16) if kernel == "native" else text()  # gpt2load's kernel takes up to 16 rows (one per position)
    for entropy in (None, 1.0, 3.0):  # as the logits are, and spread as a trained model's
        top1, kl = fidelity(fp32, q, idx, entropy)
        assert top1 >= MIN_TOP1_AGREEMENT and 0 < kl <= MAX_MEAN_KL, (entropy, top1, kl)


def test_int8_kernels_agree_and_decode_the_same_tokens(models):
    _, q = models
    prompt = text(6, seed=1)
    out = {}
    for kernel in INT8_KERNELS:
        m = use_int8_kernel(q, kernel)
        with torch.inference_mode():
            out[kernel] = (m(text(16)).float(), generate(m, prompt, 12))  # (16 rows: gpt2load's kernel too)
    torch.testing.assert_close(out["pack"][0], out["exact"][0], atol=0.05, rtol=0.02)  # bf16 compute vs float32
    torch.testing.assert_close(out["native"][0], out["exact"][0], atol=1e-4, rtol=1e-4)  # both float32 sums
    assert torch.equal(out["pack"][1], out["exact"][1]) and torch.equal(out["native"][1], out["exact"][1])


def test_saved_int8_reloads_as_int8_with_the_same_outputs(models, tmp_path):
    _, q = models
    save_model(q, tmp_path / "q")
    header, meta = read_header(tmp_path / "q" / "model.safetensors")
    assert meta["quantized"] == "int8"
    assert header["trf_blocks.0.att.W_query.qweight"]["dtype"] == "I8"
    assert header["tok_emb.qweight"]["dtype"] == "I8" and "trf_blocks.0.att.W_query.weight" not in header
    assert "out_head.qweight" not in header and "tok_emb.weight" not in header  # the tied head: stored once
    back = load_gpt2(tmp_path / "q", device="cpu")
    assert quantization(back) == "int8"
    for (k, a), (k2, b) in zip(q.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    prompt = text(5, seed=2)
    assert torch.equal(generate(back, prompt, 10), generate(q, prompt, 10))
    bf16 = load_gpt2(tmp_path / "q", device="cpu", dtype="bfloat16")  # activations in bf16, weights int8
    assert bf16.pos_emb.weight.dtype == torch.bfloat16 and bf16.out_head.qweight.dtype == torch.int8
    assert bf16.head_tied and bf16.tok_emb(prompt).dtype == torch.bfloat16
    assert generate(bf16, prompt, 3).shape == (1, 8)


def test_load_gpt2_quantize_int8(models, tmp_path):
    fp32, q = models
    save_model(fp32, tmp_path / "f")
    loaded = load_gpt2(tmp_path / "f", device="cpu", quantize="int8")
    assert quantization(loaded) == "int8"
    with torch.inference_mode():
        torch.testing.assert_close(loaded(text()), q(text()))  # the same computation: same int8 values
    with pytest.raises(Gpt2LoadError, match="unknown quantization 'int4'"):
        load_gpt2(tmp_path / "f", device="cpu", quantize="int4")


def test_quantized_model_refuses_training(models):
    _, q = models
    batch = (text(9)[:, :8], text(9)[:, 1:])
    with pytest.raises(Gpt2LoadError, match="int8 .* cannot be trained"):
        train(copy.deepcopy(q), [batch], max_steps=1)


def test_exports_refuse_int8_unless_dequantized(models, tmp_path):
    fp32, q = models
    for to in ("hf", "pth", "gguf"):
        with pytest.raises(Gpt2LoadError, match="int8 .*dequantize"):
            export(q, to, tmp_path / f"{to}-out")
        assert not (tmp_path / f"{to}-out").exists()
    with pytest.raises(Gpt2LoadError, match="int8 .*dequantize"):
        export_gguf(q, tmp_path / "direct.gguf")
    assert not (tmp_path / "direct.gguf").exists()
    out = export(q, "pth", tmp_path / "m.pth", dequantize=True)
    back = load_gpt2(out, device="cpu", n_heads=TINY.n_heads)
    assert quantization(back) is None and quantization(q) == "int8"  # the model itself is unchanged
    with torch.inference_mode():
        torch.testing.assert_close(back(text()), dequantize_model(copy.deepcopy(q))(text()))
        top1, kl = fidelity(fp32, back, text())
    assert top1 >= MIN_TOP1_AGREEMENT and kl <= MAX_MEAN_KL


def test_cli_generate_int8_and_convert_refusal(models, tmp_path):
    fp32, _ = models
    save_model(fp32, tmp_path / "f")
    q = load_gpt2(tmp_path / "f", device="cpu", quantize="int8")
    save_model(q, tmp_path / "q")
    proc = run_cli("convert", "--model", str(tmp_path / "q"), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert_clean_error(proc, "int8", "--dequantize")
    assert not (tmp_path / "hf").exists()
    proc = run_cli(
        "convert", "--model", str(tmp_path / "q"), "--to", "hf", "--out", str(tmp_path / "hf"), "--dequantize"
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "hf" / "config.json").is_file()


def test_int8_files_of_gpt2load_0x_still_load(models, tmp_path):
    """0.x files kept the float token embedding and gave the head its own int8 copy: they load as they are
    (and save back in that form)."""
    fp32, _ = models
    old = quantize_model(copy.deepcopy(fp32), embedding=False)
    assert type(old.tok_emb) is nn.Embedding and isinstance(old.out_head, Int8Linear) and not old.head_tied
    save_model(old, tmp_path / "old")
    header, meta = read_header(tmp_path / "old" / "model.safetensors")
    assert header["tok_emb.weight"]["dtype"] == "F32" and header["out_head.qweight"]["dtype"] == "I8"
    back = load_gpt2(tmp_path / "old", device="cpu")
    assert type(back.tok_emb) is nn.Embedding and quantization(back) == "int8"
    prompt = text(5, seed=4)
    assert torch.equal(generate(back, prompt, 8), generate(old, prompt, 8))
    save_model(back, tmp_path / "again")
    assert read_header(tmp_path / "again" / "model.safetensors")[0].keys() == header.keys()


@pytest.mark.parametrize("bias", [True, False])
def test_int8_classifier_and_untied_heads_round_trip(models, tmp_path, bias):
    fp32, _ = models
    for name, head in (("cls", nn.Linear(TINY.emb_dim, 3, bias=bias)), ("lm", None)):
        m = copy.deepcopy(fp32)
        if head is None:
            m.untie_head()
        else:
            m.out_head = head
        q = quantize_model(m)
        assert not q.head_tied and isinstance(q.tok_emb, Int8Embedding)
        save_model(q, tmp_path / f"{name}{bias}")
        back = load_gpt2(tmp_path / f"{name}{bias}", device="cpu")
        assert not back.head_tied and back.head_meta() == q.head_meta()
        for (k, a), (k2, b) in zip(q.state_dict().items(), back.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(a, b), k
        with torch.inference_mode():
            assert torch.equal(back(text()), q(text()))


def test_dequantized_tied_model_is_tied_again(models):
    _, q = models
    f = dequantize_model(copy.deepcopy(q))
    assert quantization(f) is None and f.head_tied and type(f.tok_emb) is nn.Embedding
    torch.testing.assert_close(f.tok_emb.weight, q.tok_emb.dequantized())


def test_quantizing_a_loaded_model_lets_go_of_the_float_file(tmp_path):
    """load_gpt2(quantize="int8") from a float file: the process holds about a quarter of the float bytes (the
    float file's pages are released), measured as resident memory in a fresh process."""
    import json
    import subprocess
    import sys

    from gpt2load.model.config import GPTConfig

    cfg = GPTConfig(vocab_size=50257, context_length=256, emb_dim=384, n_heads=6, n_layers=4)
    _, big = pair(cfg, seed=0)
    save_model(big, tmp_path / "f")
    float_bytes = sum(p.numel() * 4 for p in big.parameters())
    probe = (
        "import json, sys, torch\n"
        "from gpt2load import generate, load_gpt2\n"
        "def rss():\n"
        "    return int(dict(ln.split(':', 1) for ln in open('/proc/self/status'))['VmRSS'].split()[0]) * 1024\n"
        "before = rss()\n"
        "m = load_gpt2(sys.argv[1], device='cpu', quantize=sys.argv[2] or None)\n"
        "loaded = rss() - before\n"
        "generate(m, torch.tensor([[1, 2, 3]]), 4)\n"
        "print(json.dumps([loaded, rss() - before]))\n"
    )
    grown = {}
    for kind in ("", "int8"):
        out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "f"), kind], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        grown[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    assert grown[""][1] > 0.8 * float_bytes  # decoding touches every float weight: the probe sees them
    # int8 weights are a quarter of float32's (+ a little allocator slack); float pages are not kept
    assert grown["int8"][0] < 0.4 * float_bytes, (grown, float_bytes)
    assert grown["int8"][1] < 0.5 * grown[""][1], (grown, float_bytes)
