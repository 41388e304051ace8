"""Reading GGUF `gpt2` files: gpt2load's own exports, and files written here independently with the gguf package's
GGUFWriter in llama.cpp's gpt2 layout (Conv1D weights transposed, output.weight a copy of token_embd), each
loaded by load_gpt2 and compared with transformers on the same weights."""

import json
import sys

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli
from oracle import gpt_from_hf, hf_model, pair

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.gguf import export_gguf
from gpt2load.formats.ggufread import open_gguf
from gpt2load.load import load_gpt2, load_tokenizer
from gpt2load.model.config import GPTConfig
from gpt2load.tensors import iter_tensors
from gpt2load.tokenizer import encode, tokenizer_from_folder

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install '.[gguf]'")

LM = GPTConfig(vocab_size=50257, context_length=48, emb_dim=64, n_heads=4, n_layers=2)
N_MERGES = 100  # the independent files' tokenizer: GPT-2's 256 bytes, its first 100 merges, <|endoftext|>
SMALL = GPTConfig(vocab_size=256 + N_MERGES + 1, context_length=48, emb_dim=64, n_heads=4, n_layers=2)
# Largest |logit| difference from transformers per stored type (loaded as float32; q8_0 is lossy).
TOLERANCE = {"f32": 1e-4, "f16": 0.05, "bf16": 0.3, "q8_0": 0.5}
TEXT = "Hello, world! It's a test: naïve café, 12345 and <|endoftext|> more"


def _logits_gap(model, hf, vocab: int) -> float:
    x = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(x).float() - hf(x).logits).abs().max().item()


@pytest.fixture(scope="module")
def lm():
    return pair(LM, seed=1)


@pytest.fixture(scope="module")
def own_files(lm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    return {dt: export_gguf(lm[1], folder / f"m-{dt}.gguf", TOKENIZER_DIR, dt) for dt in TOLERANCE}


@pytest.mark.parametrize("dt", list(TOLERANCE))
def test_gpt2loads_own_gguf_gives_transformers_logits(lm, own_files, dt):
    hf, _ = lm
    model = load_gpt2(own_files[dt], device="cpu", dtype="float32", quiet=True)
    assert model.out_head.weight is model.tok_emb.weight  # no output.weight: tied
    assert model.trf_blocks[0].att.W_key.weight.dtype == torch.float32  # q8_0 dequantized
    assert _logits_gap(model, hf, LM.vocab_size) < TOLERANCE[dt]


def test_stored_types_are_kept(own_files):
    src = open_gguf(own_files["bf16"])
    assert src.kind == "gguf" and src.cfg == LM and src.dtype() == torch.bfloat16
    t = dict(src.tensors())
    assert t["tok_emb.weight"].dtype == torch.bfloat16 and t["pos_emb.weight"].dtype == torch.float32
    model = load_gpt2(own_files["f16"], device="cpu", quiet=True)  # without dtype=: as stored
    assert model.tok_emb.weight.dtype == torch.float16


def test_q8_0_with_quantize_int8_requantizes(lm, own_files):
    from gpt2load.model.quant import Int8Linear

    model = load_gpt2(own_files["q8_0"], device="cpu", quantize="int8", quiet=True)
    assert isinstance(model.trf_blocks[0].att.W_query, Int8Linear)
    assert _logits_gap(model, lm[0], LM.vocab_size) < 2 * TOLERANCE["q8_0"]


def test_tokenizer_from_the_files_metadata_equals_the_real_one(own_files):
    assert not (own_files["f32"].parent / "encoder.json").exists()
    enc, real = load_tokenizer(own_files["f32"]), tokenizer_from_folder(TOKENIZER_DIR)
    assert enc.n_vocab == real.n_vocab
    assert encode(enc, TEXT) == encode(real, TEXT)
    assert enc.decode(encode(enc, TEXT)) == TEXT


def _small_tokens() -> tuple[list[str], list[str]]:
    """GPT-2's first 256 + N_MERGES tokens (ids are merge ranks) and <|endoftext|>, and the merges making them."""
    encoder = json.loads((TOKENIZER_DIR / "encoder.json").read_text(encoding="utf-8"))
    tokens = [t for t, i in sorted(encoder.items(), key=lambda kv: kv[1]) if i < 256 + N_MERGES]
    merges = (TOKENIZER_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1 : 1 + N_MERGES]
    return [*tokens, "<|endoftext|>"], merges


def _llama_cpp_layout(hf) -> list[tuple[str, torch.Tensor]]:
    """llama.cpp's gpt2 tensors from a transformers state_dict, named by hand here (not from gpt2load's table)."""
    sd = {k.removeprefix("transformer."): v.detach() for k, v in hf.state_dict().items()}
    conv1d = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm"}
    names |= {"mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    out = [("token_embd.weight", sd["wte.weight"]), ("position_embd.weight", sd["wpe.weight"])]
    for i in range(hf.config.n_layer):
        for part, gname in names.items():
            for kind in ("weight", "bias"):
                t = sd[f"h.{i}.{part}.{kind}"]
                out.append((f"blk.{i}.{gname}.{kind}", t.T if f".{part}.{kind}".endswith(conv1d) else t))
    out += [("output_norm.weight", sd["ln_f.weight"]), ("output_norm.bias", sd["ln_f.bias"])]
    return [*out, ("output.weight", hf.lm_head.weight.detach())]  # llama.cpp writes a tied head as a copy


def write_independent(path, hf, dtype: str = "f32", arch: str = "gpt2", raw: dict | None = None):
    """A GGUF file as llama.cpp's converter lays out GPT-2, written with GGUFWriter directly."""
    q = gguf.GGMLQuantizationType
    cfg = hf.config
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(cfg.n_positions)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(1e-5)
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[dtype])
    tokens, merges = _small_tokens()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(merges)
    for name, t in _llama_cpp_layout(hf):
        a = t.contiguous().numpy().astype(np.float32)
        if name in (raw or {}):
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])  # raw blocks: bytes per row
        elif a.ndim == 1 or name == "position_embd.weight" or dtype == "f32":
            w.add_tensor(name, a)
        elif dtype == "f16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, q.Q8_0), raw_dtype=q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small():
    return hf_model(SMALL, seed=2)


@pytest.mark.parametrize("dt", ["f32", "f16", "q8_0"])
def test_an_independently_written_llama_cpp_layout_loads(small, tmp_path, dt):
    path = write_independent(tmp_path / "any-name.bin", small, dt)  # recognised by content, not suffix
    model = load_gpt2(path, device="cpu", dtype="float32", quiet=True)
    assert model.out_head.weight is model.tok_emb.weight  # output.weight equal to token_embd: the tie kept
    assert _logits_gap(model, small, SMALL.vocab_size) < TOLERANCE[dt]


def test_an_untied_output_head_is_kept(small, tmp_path):
    other = hf_model(SMALL, seed=2)
    other.lm_head.weight = torch.nn.Parameter(other.transformer.wte.weight.detach() * 0.5)
    model = load_gpt2(write_independent(tmp_path / "u.gguf", other), device="cpu", quiet=True)
    assert model.out_head.weight is not model.tok_emb.weight
    assert torch.equal(model.out_head.weight, other.lm_head.weight)
    assert _logits_gap(model, other, SMALL.vocab_size) < 1e-4
    names = [n for n, _ in iter_tensors(tmp_path / "u.gguf", layout="hf")]
    assert "lm_head.weight" in names


def test_small_tokenizer_from_metadata(small, tmp_path):
    enc = load_tokenizer(write_independent(tmp_path / "t.gguf", small))
    real = tokenizer_from_folder(TOKENIZER_DIR)
    assert enc.n_vocab == SMALL.vocab_size
    # Each of its tokens is one of GPT-2's: decoding its encoding gives the text back, as GPT-2's ids would.
    ids = encode(enc, TEXT)
    assert enc.decode(ids) == TEXT and all(real.decode([i]) == enc.decode([i]) for i in ids if i < 356)


def test_malformed_files_are_one_line(small, tmp_path):
    with pytest.raises(Gpt2LoadError, match="architecture 'llama'"):
        load_gpt2(write_independent(tmp_path / "l.gguf", small, arch="llama"), quiet=True)
    q4 = gguf.GGMLQuantizationType.Q4_0
    raw = {"blk.0.ffn_up.weight": (np.zeros((256, 64 // 32 * 18), dtype=np.uint8), q4)}  # 18-byte blocks of 32
    with pytest.raises(Gpt2LoadError, match="'blk.0.ffn_up.weight'.*Q4_0"):
        load_gpt2(write_independent(tmp_path / "q4.gguf", small, raw=raw), quiet=True)
    good = write_independent(tmp_path / "g.gguf", small).read_bytes()
    for cut in (6, 100, len(good) // 2, len(good) - 10):
        (tmp_path / "cut.gguf").write_bytes(good[:cut])
        with pytest.raises(Gpt2LoadError, match="cut.gguf"):
            load_gpt2(tmp_path / "cut.gguf", quiet=True)
    with pytest.raises(Gpt2LoadError, match="4 attention heads, not the 2"):
        load_gpt2(tmp_path / "g.gguf", n_heads=2, quiet=True)


def test_cli_info_and_clean_errors(small, tmp_path):
    path = write_independent(tmp_path / "m.gguf", small, "q8_0")
    proc = run_cli("info", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["layout"] == "gguf" and data["vocab_size"] == SMALL.vocab_size and data["n_layers"] == 2
    proc = run_cli("info", str(path), "--tensors")
    assert proc.returncode == 0 and "trf_blocks.1.att.W_value.weight" in proc.stdout, proc.stderr
    (tmp_path / "bad.gguf").write_bytes(path.read_bytes()[:1000])
    assert_clean_error(run_cli("info", str(tmp_path / "bad.gguf")), "bad.gguf")


def test_info_reports_the_files_own_tokenizer(own_files, small, tmp_path):
    from gpt2load.info import info

    assert not (own_files["f16"].parent / "vocab.json").exists()
    got = info(str(own_files["f16"]))
    assert got["tokenizer_vocab_size"] == 50257 and "vocab_note" not in got
    proc = run_cli("info", str(write_independent(tmp_path / "m.gguf", small)), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokenizer_vocab_size"] == SMALL.vocab_size


def test_missing_gguf_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(Gpt2LoadError, match=r"pip install 'gpt2load\[gguf\]'"):
        open_gguf(tmp_path / "x.gguf")


def test_gpt_from_hf_agrees_for_the_small_model(small):
    """The oracle itself: the small model's GPTModel and transformers agree (so the gaps above are the file's)."""
    assert _logits_gap(gpt_from_hf(small, SMALL), small, SMALL.vocab_size) < 1e-4
