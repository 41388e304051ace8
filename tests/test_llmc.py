"""llm.c's model files (versions 3 and 5): read against transformers, written byte for byte as llm.c's
train_gpt2.py lays them out, refused in one line when malformed.

The reference files are written here by `llmc_bytes`, a small numpy writer that follows the published layout
(a 256-int32 header, then each kind of tensor stacked over the layers, the token embedding padded with zero rows
to a multiple of 128), from transformers' own state_dict: independent of gpt2load's reader and writer.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_DIR, add_tokenizer, assert_clean_error, run_cli
from oracle import TINY, hf_model, pair

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.exports import export
from gpt2load.formats.layouts import open_source
from gpt2load.formats.llmc import export_llmc, open_llmc
from gpt2load.formats.names import expected_shapes
from gpt2load.load import load_gpt2
from gpt2load.model.build import model_from_tensors
from gpt2load.model.config import GPTConfig
from gpt2load.tensors import iter_tensors
from gpt2load.tokenizer import tokenizer_from_folder

LM = GPTConfig(vocab_size=50257, context_length=96, emb_dim=64, n_heads=4, n_layers=2)
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 0, 6, 10, 2, 2, 1, 95]])


def llmc_bytes(hf, dtype: str = "float32", header: dict[int, int] | None = None) -> bytes:
    """llm.c's model file of a transformers GPT2LMHeadModel: version 3 (float32) or 5 (bfloat16)."""
    c = hf.config
    sd = {k.removeprefix("transformer."): v.detach() for k, v in hf.state_dict().items()}
    padded = -(-c.vocab_size // 128) * 128
    h = np.zeros(256, dtype="<i4")
    version = 3 if dtype == "float32" else 5
    h[:8] = [20240326, version, c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd, padded]
    for i, v in (header or {}).items():
        h[i] = v
    wte = torch.cat([sd["wte.weight"], torch.zeros(padded - c.vocab_size, c.n_embd)])
    per_layer = [
        ("ln_1.weight", False),
        ("ln_1.bias", False),
        ("attn.c_attn.weight", True),  # Conv1D [in, out]: llm.c stores nn.Linear's [out, in]
        ("attn.c_attn.bias", False),
        ("attn.c_proj.weight", True),
        ("attn.c_proj.bias", False),
        ("ln_2.weight", False),
        ("ln_2.bias", False),
        ("mlp.c_fc.weight", True),
        ("mlp.c_fc.bias", False),
        ("mlp.c_proj.weight", True),
        ("mlp.c_proj.bias", False),
    ]
    parts = [wte, sd["wpe.weight"]]
    for name, conv in per_layer:
        parts += [sd[f"h.{i}.{name}"].t() if conv else sd[f"h.{i}.{name}"] for i in range(c.n_layer)]
    parts += [sd["ln_f.weight"], sd["ln_f.bias"]]
    if dtype == "float32":
        body = b"".join(p.float().contiguous().numpy().tobytes() for p in parts)
    else:
        body = b"".join(p.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes() for p in parts)
    return h.tobytes() + body


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def tiny():
    return pair(TINY, seed=4)


def test_float32_file_gives_transformers_logits_with_the_padded_rows_kept(tiny, tmp_path):
    hf, _ = tiny
    path = _write(tmp_path / "gpt2_tiny.bin", llmc_bytes(hf))
    model = load_gpt2(path, device="cpu")
    assert model.cfg.vocab_size == 128 and model.tok_emb.weight.dtype == torch.float32
    assert model.out_head.weight is model.tok_emb.weight  # llm.c ties its head
    assert not model.tok_emb.weight[96:].any()  # llm.c's zero rows, kept
    with torch.no_grad():
        ours, want = model(IDS), hf(IDS).logits
    torch.testing.assert_close(ours[..., :96], want, atol=1e-4, rtol=0)
    assert not ours[..., 96:].any()
    src = open_source(path)
    assert src.kind == "llmc" and src.dtype() == torch.float32
    assert src.metadata() == {"llmc_version": "3", "llmc_vocab_size": "96", "llmc_padded_vocab_size": "128"}


def test_bfloat16_file_stays_bfloat16_and_matches_transformers(tiny, tmp_path):
    hf, _ = tiny
    path = _write(tmp_path / "m_bf16.bin", llmc_bytes(hf, "bfloat16"))
    model = load_gpt2(path, device="cpu")
    assert open_source(path).dtype() == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    as_f32 = load_gpt2(path, device="cpu", dtype="float32")
    rounded = hf_model(TINY, seed=4)
    with torch.no_grad():
        for p in rounded.parameters():  # transformers on the same (bfloat16-rounded) weights
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(as_f32(IDS)[..., :96], rounded(IDS).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(IDS)[..., :96].float(), hf(IDS).logits, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_writer_gives_llmc_layout_byte_for_byte_and_reads_back(tiny, tmp_path, dtype):
    hf, gpt = tiny
    out = export_llmc(gpt, tmp_path / f"ours-{dtype}.bin", dtype)
    assert out.read_bytes() == llmc_bytes(hf, dtype)
    back = load_gpt2(out, device="cpu")
    again = export_llmc(back, tmp_path / f"again-{dtype}.bin")  # padded already, in its own dtype: unchanged
    assert again.read_bytes() == out.read_bytes()
    if dtype == "float32":
        with torch.no_grad():
            torch.testing.assert_close(back(IDS)[..., :96], gpt(IDS), atol=1e-5, rtol=0)


def test_writer_refusals_and_zero_qkv_biases(tiny, tmp_path):
    _, gpt = tiny
    with pytest.raises(Gpt2LoadError, match="float32 or bfloat16, not float16"):
        export_llmc(gpt, tmp_path / "h.bin", "float16")
    untied = load_gpt2(export_llmc(gpt, tmp_path / "t.bin"), device="cpu")
    untied.untie_head()
    with pytest.raises(Gpt2LoadError, match="head"):
        export_llmc(untied, tmp_path / "u.bin")
    with pytest.raises(Gpt2LoadError, match="earlier gpt2load llmc output"):
        export(gpt, "llmc", tmp_path / "t.bin")
    export(gpt, "llmc", tmp_path / "t.bin", force=True)
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=False)

    torch.manual_seed(0)
    m = model_from_tensors(cfg, ((k, torch.randn(s)) for k, s in expected_shapes(cfg).items()), device="cpu")
    back = load_gpt2(export_llmc(m, tmp_path / "nb.bin"), device="cpu")
    assert not back.trf_blocks[0].att.W_query.bias.any()
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(back(x)[..., :64], m(x), atol=1e-5, rtol=0)


def test_iter_tensors_and_tensor_table_read_llmc(tiny, tmp_path):
    hf, gpt = tiny
    path = _write(tmp_path / "m.bin", llmc_bytes(hf))
    got = dict(iter_tensors(path, "hf"))
    torch.testing.assert_close(got["transformer.h.1.attn.c_attn.weight"], hf.transformer.h[1].attn.c_attn.weight)
    proc = run_cli("info", str(path), "--tensors", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["tok_emb.weight"]["shape"] == [128, 32] and rows["tok_emb.weight"]["dtype"] == "float32"


def _corrupt(hf, tmp_path: Path, name: str) -> Path:
    good = llmc_bytes(hf)
    cases = {
        "truncated": good[:-10],
        "trailing": good + b"\0" * 4,
        "header-only": good[:1024],
        "short-header": good[:100],
        "version-2": llmc_bytes(hf, header={1: 2}),
        "version-4": llmc_bytes(hf, header={1: 4}),
        "layers-huge": llmc_bytes(hf, header={4: 2**31 - 1}),
        "width-negative": llmc_bytes(hf, header={6: -64}),
        "padded-below-vocab": llmc_bytes(hf, header={7: 64}),
        "lying-xl": llmc_bytes(hf, header={2: 1024, 4: 48, 5: 25, 6: 1600, 3: 50257, 7: 50304}),
    }
    return _write(tmp_path / f"{name}.bin", cases[name])


NEEDLES = {
    "truncated": "truncated",
    "trailing": "longer than its header says",
    "header-only": "truncated",
    "short-header": "truncated",
    "version-2": "version 2",
    "version-4": "version 4",
    "layers-huge": "n_layers",
    "width-negative": "emb_dim",
    "padded-below-vocab": "padded vocabulary 64",
    "lying-xl": "truncated",
}


@pytest.mark.parametrize("name", list(NEEDLES))
def test_malformed_files_are_one_line(tiny, tmp_path, name):
    path = _corrupt(tiny[0], tmp_path, name)
    with pytest.raises(Gpt2LoadError, match=NEEDLES[name]) as e:
        open_llmc(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_wrong_magic_is_named(tiny, tmp_path):
    path = _write(tmp_path / "x.bin", llmc_bytes(tiny[0], header={0: 20240327}))
    with pytest.raises(Gpt2LoadError, match="magic number 20240327, expected 20240326"):
        open_llmc(path)


@pytest.fixture(scope="module")
def memory_limit() -> int:
    """What importing gpt2load maps here, plus 1 GB: far below what an unchecked xl-sized header would take."""
    code = "import gpt2load; print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout) * 1024 + 2**30


@pytest.mark.parametrize("name", ["lying-xl", "layers-huge", "version-4", "truncated"])
def test_cli_refuses_malformed_files_with_bounded_memory(tiny, tmp_path, name, memory_limit):
    path = _corrupt(tiny[0], tmp_path, name)
    proc = run_cli("generate", "--model", str(path), "--prompt", "A", "--device", "cpu", memory_limit=memory_limit)
    assert proc.returncode == 1
    assert_clean_error(proc, NEEDLES[name], str(path))


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    """A transformers folder of a tiny model with GPT-2's real vocabulary and tokenizer."""
    folder = tmp_path_factory.mktemp("llmc") / "hf"
    hf_model(LM, seed=1).save_pretrained(folder)
    return add_tokenizer(folder, ("vocab.json", "merges.txt"))


def test_cli_convert_to_llmc_then_generate_and_info(lm_folder, tmp_path):
    (tmp_path / "llmc").mkdir()
    out_dir = add_tokenizer(tmp_path / "llmc")  # generate reads the tokenizer beside the model file
    for dtype in ("float32", "bfloat16"):
        out = out_dir / f"m-{dtype}.bin"
        proc = run_cli("convert", "--model", str(lm_folder), "--to", "llmc", "--dtype", dtype, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert open_llmc(out).metadata()["llmc_version"] == ("3" if dtype == "float32" else "5")
    gen = ("generate", "--prompt", "Hello, world", "--max-new-tokens", "8", "--device", "cpu", "--json", "--model")
    want = run_cli(*gen, str(lm_folder))
    got = run_cli(*gen, str(out_dir / "m-float32.bin"))
    assert want.returncode == 0 and got.returncode == 0, (want.stderr, got.stderr)
    assert json.loads(got.stdout)["completions"] == json.loads(want.stdout)["completions"]
    proc = run_cli("info", str(out_dir / "m-bfloat16.bin"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["layout"] == "llmc" and data["dtype"] == "bfloat16" and data["vocab_size"] == 50304
    assert data["tokenizer_vocab_size"] == 50257 and "50257..50303" in data["vocab_note"]
    proc = run_cli("convert", "--model", str(lm_folder), "--to", "llmc", "--dtype", "float16", "--out", "x.bin")
    assert_clean_error(proc, "float32 or bfloat16")


def test_tokenizer_dir_is_real():
    assert (TOKENIZER_DIR / "encoder.json").is_file()


def _read_llmc_tokenizer(path: Path) -> tuple[list[int], list[bytes]]:
    """An independent reader of llm.c's gpt2_tokenizer.bin: 256 int32, then a uint8 length and bytes per id."""
    data = path.read_bytes()
    header = list(struct.unpack("<256i", data[:1024]))
    tokens, pos = [], 1024
    for _ in range(header[2]):
        n = data[pos]
        tokens.append(data[pos + 1 : pos + 1 + n])
        pos += 1 + n
    assert pos == len(data)
    return header, tokens


def test_writer_puts_llm_c_tokenizer_beside_the_file_and_keeps_a_foreign_one(tiny, tmp_path, capsys):
    _, gpt = tiny
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    out = export(gpt, "llmc", tmp_path / "a" / "m.bin", tokenizer_dir=TOKENIZER_DIR)
    header, tokens = _read_llmc_tokenizer(out.parent / "gpt2_tokenizer.bin")
    assert header[:4] == [20240328, 2, 50257, 50256] and not any(header[4:])
    for i in (0, 11, 198, 464, 1000, 31373, 50255, 50256):
        assert tokens[i] == enc.decode_single_token_bytes(i)
    export(gpt, "llmc", tmp_path / "a" / "m2.bin", tokenizer_dir=TOKENIZER_DIR)  # ours: written again
    assert "notice" not in capsys.readouterr().err
    export_llmc(gpt, tmp_path / "b" / "m.bin")  # no tokenizer given: none written
    assert not (tmp_path / "b" / "gpt2_tokenizer.bin").exists()
    foreign = tmp_path / "b" / "gpt2_tokenizer.bin"
    foreign.write_bytes(b"llm.c's own")
    export(gpt, "llmc", tmp_path / "b" / "m2.bin", tokenizer_dir=TOKENIZER_DIR)
    assert foreign.read_bytes() == b"llm.c's own"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gpt2load did not write it" in err[0]
