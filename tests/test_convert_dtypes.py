"""Export dtypes, dtype-keeping loads, the public tensor iterator, `info --tensors`, and streaming exports."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import OPENAI_TINY, TOKENIZER_DIR, add_tokenizer, copy_fixture, run_cli
from oracle import TINY, pair
from safetensors import safe_open
from transformers import GPT2LMHeadModel

from gpt2load import iter_tensors
from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.exports import export
from gpt2load.formats.relayout import layout_specs
from gpt2load.formats.stfile import read_header
from gpt2load.formats.tfcheckpoint import TFCheckpoint
from gpt2load.load import load_gpt2
from gpt2load.model.build import dtype_name
from gpt2load.model.gpt import GPTModel, stored_state

X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return pair()[1]


def _logits(m):
    with torch.no_grad():
        return m(X)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("to, name", [("safetensors", "own"), ("safetensors", "m.safetensors"), ("hf", "hf")])
def test_export_dtype_is_recorded_and_kept_on_load(model, tmp_path, to, name, dtype):
    out = export(model, to, tmp_path / name, dtype=dtype_name(dtype))
    weights = out if out.suffix == ".safetensors" else out / "model.safetensors"
    header, meta = read_header(weights)
    assert {e["dtype"] for e in header.values()} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    if out.is_dir():
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype_name(dtype)
    else:
        assert meta["dtype"] == dtype_name(dtype)
    back = load_gpt2(out, device="cpu")
    assert back.tok_emb.weight.dtype == dtype and back.out_head.weight is back.tok_emb.weight
    # The same weights and computation as casting the model itself: equal logits.
    cast = load_gpt2(out, device="cpu", dtype="float32").to(dtype)
    assert torch.equal(_logits(back), _logits(cast))
    assert load_gpt2(out, device="cpu", dtype="float32").tok_emb.weight.dtype == torch.float32
    ref = {k: v.to(dtype) for k, v in stored_state(model).items()}
    assert all(torch.equal(v, ref[k]) for k, v in stored_state(back).items())


def test_hf_float16_export_loads_in_transformers(model, tmp_path):
    out = export(model, "hf", tmp_path / "hf", dtype="float16")
    hf = GPT2LMHeadModel.from_pretrained(out, torch_dtype="auto").eval()
    assert hf.transformer.wte.weight.dtype == torch.float16
    with torch.no_grad():
        ours = load_gpt2(out, device="cpu", dtype="float32")(X)
        theirs = GPT2LMHeadModel.from_pretrained(out, torch_dtype=torch.float32).eval()(X).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_pth_dtype_and_shared_storage(model, tmp_path):
    out = export(model, "pth", tmp_path / "m.pth", dtype="bfloat16")
    state = torch.load(out, weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert state["out_head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()  # stored once
    book = GPTModel(TINY)
    book.load_state_dict(state, strict=True)
    with pytest.raises(Gpt2LoadError, match="GGUF quantization"):
        export(model, "pth", tmp_path / "q.pth", dtype="q8_0")


def test_convert_cli_dtype_round_trip(tmp_path):
    tiny = add_tokenizer(copy_fixture("openai-tiny", tmp_path))
    out = tmp_path / "hf16"
    proc = run_cli("convert", "--model", str(tiny), "--to", "hf", "--dtype", "bfloat16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ref = load_gpt2(tiny, device="cpu", dtype="bfloat16")
    assert all(torch.equal(v, stored_state(ref)[k]) for k, v in stored_state(load_gpt2(out, device="cpu")).items())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, shapes, dtypes and bytes."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k


def test_iter_tensors_each_layout_from_the_tf_fixture_and_an_hf_folder(tmp_path):
    ck = TFCheckpoint(OPENAI_TINY)
    tf = {k: ck.read(k).clone() for k in ck.keys()}
    _same(dict(iter_tensors(OPENAI_TINY, "openai")), tf)
    book = load_gpt2(copy_fixture("openai-tiny", tmp_path), device="cpu")
    _same(dict(iter_tensors(OPENAI_TINY, "book")), stored_state(book))
    export(book, "hf", tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        hf_file = {k: f.get_tensor(k) for k in f.keys()}
    _same(dict(iter_tensors(OPENAI_TINY, "hf")), hf_file)
    _same(dict(iter_tensors(tmp_path / "hf", "hf")), hf_file)
    _same(dict(iter_tensors(tmp_path / "hf", "openai")), tf)  # HF folder back to TensorFlow's tensors
    # The shapes-only description agrees with what the iterator yields.
    for layout, got in [("openai", tf), ("hf", hf_file)]:
        assert {n: s for n, s, _ in layout_specs(book.cfg, layout)} == {k: tuple(v.shape) for k, v in got.items()}
    with pytest.raises(Gpt2LoadError, match="unknown tensor layout"):
        next(iter_tensors(OPENAI_TINY, "keras"))


def test_info_tensors_cli(tmp_path):
    proc = run_cli("info", str(OPENAI_TINY), "--tensors", "--layout", "openai", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    ck = TFCheckpoint(OPENAI_TINY)
    assert {r["name"]: r["shape"] for r in rows} == {k: list(ck.entries[k].shape) for k in ck.keys()}
    assert {r["dtype"] for r in rows} == {"float32"}
    assert sum(r["bytes"] for r in rows) == sum(e.size for e in ck.entries.values())
    text = run_cli("info", str(OPENAI_TINY), "--tensors")
    assert text.returncode == 0 and "trf_blocks.1.att.W_value.weight" in text.stdout
    preset = json.loads(run_cli("info", "gpt2-xl", "--tensors", "--json", "--weights-dir", str(tmp_path)).stdout)
    assert sum(r["bytes"] for r in preset) == 4 * 1_557_611_200  # described from the preset, nothing downloaded


# Exports under an address-space cap of the loaded model + a little: a format that built a second copy of the
# weights would fail. The model has many small tensors (largest 2.4 MB), 113 MB in all; the cap allows 48 MB.
STREAMING = textwrap.dedent(
    """
    import resource, sys, torch
    from gpt2load.model.config import GPTConfig
    from gpt2load.formats.exports import export
    from gpt2load.model.gpt import GPTModel
    torch.set_num_threads(1)
    tok, fmt, dtype, out = sys.argv[1:5]
    dtype = None if dtype == "-" else dtype
    def model(layers):
        torch.manual_seed(0)
        return GPTModel(GPTConfig(vocab_size=50257, context_length=64, emb_dim=384, n_heads=6, n_layers=layers))
    # Imports and first-use allocations, before the cap.
    export(model(1), "hf" if fmt == "clone" else fmt, out + ".warm", tok, dtype)
    big = model(16)
    def vm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    cap = vm() + 48 * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if fmt == "clone":  # the control: one full copy of the weights does not fit under the cap
        try:
            copy = [p.detach().clone() for p in big.parameters()]
        except (MemoryError, RuntimeError):
            print("refused")
        sys.exit(0)
    export(big, fmt, out, tok, dtype)
    print("ok", vm() - cap)
    """
)


@pytest.mark.parametrize(
    "fmt, dtype",
    [("clone", "-"), ("hf", "-"), ("safetensors", "-"), ("pth", "-"), ("hf", "bfloat16"), ("gguf", "q8_0")],
)
def test_streaming_export_peak_memory_under_a_cap(tmp_path, fmt, dtype):
    out = tmp_path / {"hf": "hf", "safetensors": "own", "pth": "m.pth", "gguf": "m.gguf", "clone": "x"}[fmt]
    env = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", STREAMING, str(TOKENIZER_DIR), fmt, dtype, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == ("refused" if fmt == "clone" else "ok"), proc.stdout
