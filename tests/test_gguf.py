"""GGUF export, checked by the file's own reader (the gguf package) and by llama.cpp itself (llama-cpp-python).

The model is tiny but has GPT-2's real 50257-token vocabulary, so llama.cpp runs it with the tokenizer the file
embeds. The llama.cpp checks skip, with the reason, where the `gguf-check` extra is not installed (unless
GPT2LOAD_REQUIRE_LLAMA is set, as in CI).
"""

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_DIR, add_tokenizer, assert_clean_error, run_cli
from oracle import gpt_from_hf, hf_model
from torch import nn

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.exports import export
from gpt2load.formats.gguf import export_gguf, gguf_names
from gpt2load.generation.generate import generate
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.tokenizer import encode, tokenizer_from_folder

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install '.[gguf]'")

LM = GPTConfig(vocab_size=50257, context_length=96, emb_dim=64, n_heads=4, n_layers=2)
TEXTS = [
    "Hello, world! It's a test.",
    "naïve café, déjà vu, Ærøskøbing, straße",
    "日本語のテキスト、中文文本，한국어",
    "emoji 🎉👍🏽 and 🏳️‍🌈 flags",
    "  runs   of\t\tspaces\n\n\n  and\r\nnewlines   ",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> again",
    "we'll they're I'M 12345 3.14159 $100",
]
# CI sets GPT2LOAD_REQUIRE_LLAMA=1 so that a missing llama-cpp-python fails these tests instead of skipping them.
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None and not os.environ.get("GPT2LOAD_REQUIRE_LLAMA"),
    reason="llama-cpp-python is not installed: pip install '.[gguf-check]' to check files with llama.cpp",
)


@pytest.fixture(scope="module")
def lm():
    return gpt_from_hf(hf_model(LM, seed=1), LM)


@pytest.fixture(scope="module")
def files(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {dt: export_gguf(lm, folder / f"tiny-{dt}.gguf", TOKENIZER_DIR, dt) for dt in ("f32", "f16", "bf16", "q8_0")}


def _field(reader, key):
    f = reader.fields[key]
    return f.contents()


def test_metadata_and_tensor_table(files, lm):
    r = gguf.GGUFReader(files["f16"])
    assert _field(r, "general.architecture") == "gpt2"
    expect = {
        "gpt2.context_length": 96,
        "gpt2.embedding_length": 64,
        "gpt2.block_count": 2,
        "gpt2.feed_forward_length": 256,
        "gpt2.attention.head_count": 4,
        "general.file_type": 1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 50256,
        "tokenizer.ggml.eos_token_id": 50256,
        "tokenizer.ggml.unknown_token_id": 50256,
    }
    assert {k: _field(r, k) for k in expect} == expect
    assert _field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[0] == "!"
    assert types[50256] == 3 and set(types[:50256]) == {1}
    assert len(_field(r, "tokenizer.ggml.merges")) == 50000
    names = [t.name for t in r.tensors]
    assert names == [n for n, _ in gguf_names(2)]  # tied head: no output.weight
    shapes = {t.name: list(t.shape) for t in r.tensors}  # GGUF order: innermost dimension first
    assert shapes["token_embd.weight"] == [64, 50257]
    assert shapes["blk.1.attn_qkv.weight"] == [64, 192]
    assert shapes["blk.0.ffn_up.weight"] == [64, 256] and shapes["blk.0.ffn_down.weight"] == [256, 64]
    types_by_name = {t.name: t.tensor_type.name for t in r.tensors}
    assert types_by_name["blk.0.attn_qkv.weight"] == "F16" and types_by_name["blk.0.attn_qkv.bias"] == "F32"
    assert types_by_name["position_embd.weight"] == "F32"


def test_f32_tensors_are_the_models_bytes_and_q8_0_is_close(files, lm):
    """f32 stores exactly the model's values (q/k/v concatenated); q8_0 is within its quantization step."""
    r32, rq = gguf.GGUFReader(files["f32"]), gguf.GGUFReader(files["q8_0"])
    blk = lm.trf_blocks[1].att
    qkv = torch.cat([blk.W_query.weight, blk.W_key.weight, blk.W_value.weight]).detach().numpy()
    t32 = {t.name: t for t in r32.tensors}
    assert np.array_equal(t32["blk.1.attn_qkv.weight"].data.reshape(192, 64), qkv)
    assert np.array_equal(t32["token_embd.weight"].data.reshape(50257, 64), lm.tok_emb.weight.detach().numpy())
    tq = {t.name: t for t in rq.tensors}
    assert tq["blk.1.attn_qkv.weight"].tensor_type.name == "Q8_0"
    back = gguf.quants.dequantize(tq["blk.1.attn_qkv.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    # Half a step per 32-value block, plus the f16 rounding of the block's scale (times up to 127 steps).
    step = np.abs(qkv).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back.reshape(-1, 32) - qkv.reshape(-1, 32)) <= step * (0.5 + 127 * 2.0**-11))


def test_untied_head_is_written_as_output(lm, tmp_path):
    untied = gpt_from_hf(hf_model(LM, seed=1), LM)
    untied.out_head.weight = nn.Parameter(untied.tok_emb.weight.detach() * 0.5)
    r = gguf.GGUFReader(export_gguf(untied, tmp_path / "u.gguf", TOKENIZER_DIR, "f32"))
    out = {t.name: t for t in r.tensors}["output.weight"]
    assert np.array_equal(out.data.reshape(50257, 64), untied.out_head.weight.detach().numpy())


def test_classifier_and_unsuitable_models_are_refused(lm, tmp_path):
    clf = gpt_from_hf(hf_model(LM, seed=1), LM)
    clf.out_head = nn.Linear(64, 2)  # the book's chapter-6 spam classifier head
    with pytest.raises(Gpt2LoadError, match="2 outputs.*classifier"):
        export(clf, "gguf", tmp_path / "c.gguf", TOKENIZER_DIR)
    with pytest.raises(Gpt2LoadError, match="tokenizer files"):
        export(lm, "gguf", tmp_path / "c.gguf", tmp_path)
    small = gpt_from_hf(hf_model(), GPTConfig(vocab_size=96, context_length=64, emb_dim=32, n_heads=4, n_layers=2))
    with pytest.raises(Gpt2LoadError, match="96 token embeddings"):
        export(small, "gguf", tmp_path / "c.gguf", TOKENIZER_DIR)
    with pytest.raises(Gpt2LoadError, match="unknown GGUF dtype"):
        export(lm, "gguf", tmp_path / "c.gguf", TOKENIZER_DIR, dtype="q4_k")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


def test_no_qkv_bias_gets_zero_biases_and_wrapped_layers_are_refused(tmp_path):
    cfg = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=False)
    torch.manual_seed(0)
    m = GPTModel(cfg).eval()
    t = {t.name: t for t in gguf.GGUFReader(export_gguf(m, tmp_path / "nb.gguf", TOKENIZER_DIR, "f32")).tensors}
    att = m.trf_blocks[0].att
    qkv = torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]).detach().numpy()
    assert np.array_equal(t["blk.0.attn_qkv.weight"].data.reshape(96, 32), qkv)
    assert not t["blk.0.attn_qkv.bias"].data.any()
    att.W_query = nn.Sequential(att.W_query)  # e.g. an adapter wrapped around the layer
    with pytest.raises(Gpt2LoadError, match="W_query.weight"):
        export_gguf(m, tmp_path / "w.gguf", TOKENIZER_DIR)


def test_convert_cli_to_gguf_from_a_transformers_folder(lm, tmp_path):
    hf_model(LM, seed=1).save_pretrained(tmp_path / "m")  # the weights `lm` holds, as transformers saves them
    add_tokenizer(tmp_path / "m", ("vocab.json", "merges.txt"))
    out = tmp_path / "m-q8.gguf"
    proc = run_cli("convert", "--model", str(tmp_path / "m"), "--to", "gguf", "--dtype", "q8_0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = gguf.GGUFReader(out)
    assert _field(r, "general.file_type") == 7
    pos = {t.name: t for t in r.tensors}["position_embd.weight"].data.reshape(96, 64)
    assert np.array_equal(pos, lm.pos_emb.weight.detach().numpy())  # kept f32
    proc = run_cli("convert", "--model", str(tmp_path / "m"), "--to", "pth", "--dtype", "q8_0", "--out", "x.pth")
    assert_clean_error(proc, "q8_0", "--to gguf")


def test_convert_cli_from_an_openai_checkpoint_to_gguf(lm, files, tmp_path):
    """OpenAI's TensorFlow layout straight to GGUF: the file holds exactly what exporting the model gives."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from tfwrite import write_checkpoint

    from gpt2load.formats.names import OPENAI, to_source_layout

    state = {k: v.detach() for k, v in lm.stored_state().items()}
    hparams = {"n_vocab": 50257, "n_ctx": 96, "n_embd": 64, "n_head": 4, "n_layer": 2}
    write_checkpoint(tmp_path / "openai", to_source_layout(state, OPENAI, lm.cfg), hparams)
    add_tokenizer(tmp_path / "openai")
    out = tmp_path / "from-tf.gguf"
    proc = run_cli("convert", "--model", str(tmp_path / "openai"), "--to", "gguf", "--dtype", "f32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    assert got.keys() == want.keys() and "blk.0.attn_qkv.weight" in got
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_convert_cli_from_a_trained_instruction_model_folder_to_gguf(lm, files, tmp_path):
    """What `train`/`finetune instruct` leave (gpt2load's folder, with a prompt template recorded) converts too."""
    from gpt2load.formats.exports import save_model

    save_model(lm, tmp_path / "run", TOKENIZER_DIR, metadata={"prompt_template": "alpaca"})
    out = tmp_path / "run.gguf"
    proc = run_cli("convert", "--model", str(tmp_path / "run"), "--to", "gguf", "--dtype", "f32", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp

    return llama_cpp


def _llama(llama_cpp, path, **kw):
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=1, seed=0, **kw)


@needs_llama
def test_llama_cpp_tokenizes_like_gpt2load(files, llama_cpp):
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    llm = _llama(llama_cpp, files["f32"], vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == encode(enc, text), text


def _llama_logits(llama_cpp, path, ids):
    llm = _llama(llama_cpp, path, n_ctx=LM.context_length, logits_all=True)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]))


PROMPT = "The quick brown fox, naïve café 日本"


@needs_llama
def test_llama_cpp_f32_greedy_continuation_equals_gpt2load(files, lm, llama_cpp):
    ids = encode(tokenizer_from_folder(TOKENIZER_DIR), PROMPT)
    with torch.no_grad():
        ours = generate(lm, torch.tensor([ids]), max_new_tokens=32)[0, len(ids) :].tolist()
    llm = _llama(llama_cpp, files["f32"], n_ctx=LM.context_length)
    theirs = []
    for tok in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(tok)
        if len(theirs) == 32:
            break
    assert theirs == ours


# Largest |llama.cpp logit - gpt2load logit| measured on this model, whose logits reach ±36 (llama.cpp 0.3.36
# built with GGML_NATIVE=OFF, one thread): f32 4e-4, f16 8e-3, bf16 6e-2, q8_0 0.20 (llama.cpp also rounds the
# activations to the weights' type for its matrix products). The tolerances are about 3x, for other CPUs' kernels.
TOLERANCE = {"f32": 2e-3, "f16": 3e-2, "bf16": 0.2, "q8_0": 0.6}


@needs_llama
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_logits_close_to_gpt2load(files, lm, llama_cpp, dtype):
    ids = encode(tokenizer_from_folder(TOKENIZER_DIR), PROMPT + " and more text to fill the context window")
    with torch.no_grad():
        ours = lm(torch.tensor([ids]))[0]
    theirs = _llama_logits(llama_cpp, files[dtype], ids)
    print(dtype, "max |diff|", (theirs - ours).abs().max().item(), "logit range", ours.abs().max().item())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=TOLERANCE[dtype])
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
