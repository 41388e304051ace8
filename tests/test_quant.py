"""int8 weight-only quantization: the modules swapped, fidelity to float32, saved and loaded as int8, refused
where float weights are needed (training, transformers and book exports)."""

import copy

import pytest
import torch
from helpers import assert_clean_error, run_cli
from oracle import TINY, pair
from torch import nn

from gpt2load import Gpt2LoadError, export, generate, load_gpt2, save_model, train
from gpt2load.quant import Int8Linear, dequantize_model, fidelity, quantization, quantize_model, quantize_weight
from gpt2load.stfile import read_header

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
    assert q.tok_emb.weight.dtype == torch.float32  # embeddings stay float; the tied head got an int8 copy
    assert torch.equal(q.tok_emb.weight, fp32.tok_emb.weight)
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


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_fidelity_to_float32_within_the_stated_bounds(models, monkeypatch, kernel):
    monkeypatch.setenv("GPT2LOAD_INT8PACK", kernel)  # torch's int8 kernel (bf16 compute) or dequantize + matmul
    fp32, q = models
    for entropy in (None, 1.0, 3.0):  # as the logits are, and spread as a trained model's
        top1, kl = fidelity(fp32, q, text(), entropy)
        assert top1 >= MIN_TOP1_AGREEMENT and 0 < kl <= MAX_MEAN_KL, (entropy, top1, kl)


def test_int8_kernels_agree_and_decode_the_same_tokens(models, monkeypatch):
    _, q = models
    prompt = text(6, seed=1)
    out = {}
    for kernel in ("1", "0"):
        monkeypatch.setenv("GPT2LOAD_INT8PACK", kernel)
        with torch.inference_mode():
            out[kernel] = (q(text()).float(), generate(q, prompt, 12))
    torch.testing.assert_close(out["1"][0], out["0"][0], atol=0.05, rtol=0.02)  # bf16 compute vs float32
    assert torch.equal(out["1"][1], out["0"][1])


def test_saved_int8_reloads_as_int8_with_the_same_outputs(models, tmp_path):
    _, q = models
    save_model(q, tmp_path / "q")
    header, meta = read_header(tmp_path / "q" / "model.safetensors")
    assert meta["quantized"] == "int8"
    assert header["trf_blocks.0.att.W_query.qweight"]["dtype"] == "I8"
    assert header["out_head.qweight"]["dtype"] == "I8" and "trf_blocks.0.att.W_query.weight" not in header
    back = load_gpt2(tmp_path / "q", device="cpu")
    assert quantization(back) == "int8"
    for (k, a), (k2, b) in zip(q.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    prompt = text(5, seed=2)
    assert torch.equal(generate(back, prompt, 10), generate(q, prompt, 10))
    bf16 = load_gpt2(tmp_path / "q", device="cpu", dtype="bfloat16")  # activations in bf16, weights int8
    assert bf16.tok_emb.weight.dtype == torch.bfloat16 and bf16.out_head.qweight.dtype == torch.int8
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
    for to in ("hf", "pth"):
        with pytest.raises(Gpt2LoadError, match="int8 .*dequantize"):
            export(q, to, tmp_path / f"{to}-out")
        assert not (tmp_path / f"{to}-out").exists()
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
