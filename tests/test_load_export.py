"""Every load path and export format: same logits, tied head kept, clear errors, nothing half-written."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import OPENAI_TINY, add_tokenizer, copy_fixture
from oracle import TINY, pair
from safetensors import safe_open
from transformers import GPT2LMHeadModel

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.cache import cache_file
from gpt2load.formats.exports import export
from gpt2load.formats.layouts import open_source
from gpt2load.formats.names import HF, OPENAI, NameMap, to_source_layout
from gpt2load.formats.ownform import CACHE_NAME
from gpt2load.formats.tfcheckpoint import TFCheckpoint
from gpt2load.load import load_gpt2
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel

X = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(X)


def assert_tied(model):
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.untyped_storage().data_ptr() == model.tok_emb.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("name_map", [OPENAI, HF], ids=["openai", "hf"])
def test_name_map_round_trip_is_identity(name_map: NameMap):
    _, model = pair()
    params = {k: v for k, v in model.state_dict().items() if k != "out_head.weight" and not k.endswith("mask")}
    source = to_source_layout(params, name_map, TINY)
    from gpt2load.formats.names import convert_tensors

    back = dict(convert_tensors(source.items(), name_map, TINY, "round trip"))
    assert back.keys() == params.keys()
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_openai_round_trip_reproduces_the_tensorflow_tensors(tmp_path):
    ck = TFCheckpoint(OPENAI_TINY)
    model = load_gpt2(copy_fixture("openai-tiny", tmp_path), device="cpu")
    params = {k: v for k, v in model.state_dict().items() if k != "out_head.weight" and not k.endswith("mask")}
    back = to_source_layout(params, OPENAI, model.cfg)
    assert back.keys() == set(ck.keys())
    assert all(torch.equal(back[k], ck.read(k)) for k in back)


def test_exports_load_back_with_identical_logits(tmp_path):
    hf, model = pair()
    ref = logits(model)
    for to, out in [
        ("safetensors", tmp_path / "own"),
        ("safetensors", tmp_path / "m.safetensors"),
        ("hf", tmp_path / "hf"),
    ]:
        export(model, to, out)
        back = load_gpt2(out, device="cpu")
        assert torch.equal(logits(back), ref), (to, out)
        assert_tied(back)


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path):
    hf, model = pair()
    add_tokenizer(tmp_path)
    export(model, "hf", tmp_path / "hf", tokenizer_dir=tmp_path)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hf"))
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(X).logits, hf(X).logits, rtol=0, atol=0)
    assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


def test_own_safetensors_stores_the_tied_head_once(tmp_path):
    _, model = pair()
    export(model, "safetensors", tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "tok_emb.weight" in keys and "out_head.weight" not in keys and not any("mask" in k for k in keys)
    assert json.loads(meta["config"]) == TINY.to_dict()


def test_pth_loads_strict_into_a_book_layout_model(tmp_path):
    _, model = pair()
    export(model, "pth", tmp_path / "m.pth")
    state = torch.load(tmp_path / "m.pth", weights_only=True)
    book = GPTModel(TINY)
    book.load_state_dict(state, strict=True)
    assert "out_head.weight" in state and "trf_blocks.0.att.mask" in state
    assert torch.equal(logits(book.eval()), logits(model))


def test_book_pth_of_a_gpt2_width_loads_with_config_read_off_the_shapes(tmp_path):
    cfg = GPTConfig(vocab_size=96, context_length=64, emb_dim=768, n_heads=12, n_layers=1)
    _, model = pair(cfg)
    export(model, "pth", tmp_path / "m.pth")
    back = load_gpt2(tmp_path / "m.pth", device="cpu")
    assert back.cfg == cfg
    assert torch.equal(logits(back), logits(model))
    assert_tied(back)


def test_transformers_save_pretrained_folder_loads(tmp_path):
    hf, model = pair()
    hf.save_pretrained(tmp_path / "saved")
    got = load_gpt2(tmp_path / "saved", device="cpu")
    assert torch.equal(logits(got), logits(model))
    assert_tied(got)


def test_hf_pytorch_bin_folder_loads(tmp_path):
    hf, model = pair()
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")  # the pre-safetensors hub layout
    assert torch.equal(logits(load_gpt2(tmp_path, device="cpu")), logits(model))


def test_unwritable_cache_falls_back_to_converting_in_memory(tmp_path):
    """Writing the cache fails (here: a file-size limit, which binds even root); the load still succeeds."""
    d = copy_fixture("openai-tiny", tmp_path)
    code = (
        "import resource, warnings, torch, gpt2load\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    m = gpt2load.load_gpt2({str(d)!r}, device='cpu')\n"
        "assert any('could not cache' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "print(m(torch.tensor([[1, 2, 3]]))[0, -1].tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cached = cache_file(open_source(d))
    assert not cached.exists() and not [p for p in os.listdir(cached.parent) if p.endswith(".tmp")]
    expected = load_gpt2(d, device="cpu")(torch.tensor([[1, 2, 3]]))[0, -1].tolist()
    assert json.loads(out.stdout) == pytest.approx(expected)


def test_first_load_caches_conversion_and_later_loads_use_it(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    first = load_gpt2(d, device="cpu")
    cache = cache_file(open_source(d))
    assert cache.is_file() and not (d / CACHE_NAME).exists()  # in gpt2load's cache folder, never beside the source
    stamp = cache.stat().st_mtime_ns
    second = load_gpt2(d, device="cpu")
    assert cache.stat().st_mtime_ns == stamp  # not rewritten
    assert torch.equal(logits(first), logits(second))
    # A changed source invalidates the cache.
    os.utime(d / "model.ckpt.data-00000-of-00001", ns=(1, 1))
    load_gpt2(d, device="cpu")
    assert cache.stat().st_mtime_ns != stamp


def test_config_comes_from_hparams_not_the_name(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    hp = json.loads((d / "hparams.json").read_text())
    assert load_gpt2(d, device="cpu").cfg == GPTConfig(
        vocab_size=hp["n_vocab"],
        context_length=hp["n_ctx"],
        emb_dim=hp["n_embd"],
        n_heads=hp["n_head"],
        n_layers=hp["n_layer"],
    )


def test_wrong_hparams_name_the_tensor(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    hp = json.loads((d / "hparams.json").read_text())
    (d / "hparams.json").write_text(json.dumps({**hp, "n_embd": 48, "n_head": 4}))
    with pytest.raises(Gpt2LoadError, match=r"tensor 'model/h0/.*shape"):
        load_gpt2(d, device="cpu")
    cached = cache_file(open_source(d))
    assert not cached.exists() and not (d / CACHE_NAME).exists()
    assert not [f for f in os.listdir(cached.parent) if f.endswith(".tmp")]


def test_more_layers_than_config_is_named(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    hp = json.loads((d / "hparams.json").read_text())
    (d / "hparams.json").write_text(json.dumps({**hp, "n_layer": 1}))
    with pytest.raises(Gpt2LoadError, match=r"model/h1/.*block the config does not have"):
        load_gpt2(d, device="cpu")


def test_missing_and_unknown_tensors_are_named(tmp_path):
    hf, _ = pair()
    hf.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "a" / "model.safetensors")
    drop = next(k for k in state if k.endswith("h.1.mlp.c_fc.bias"))
    save_file({k: v for k, v in state.items() if k != drop}, tmp_path / "a" / "model.safetensors")
    with pytest.raises(Gpt2LoadError, match=r"lacks tensors for trf_blocks.1.ff.layers.0.bias"):
        load_gpt2(tmp_path / "a", device="cpu")
    save_file({**state, "transformer.h.0.attn.rotary": torch.zeros(2)}, tmp_path / "a" / "model.safetensors")
    with pytest.raises(Gpt2LoadError, match=r"'h.0.attn.rotary'.*not part of the Hugging Face GPT-2 layout"):
        load_gpt2(tmp_path / "a", device="cpu")


def test_corrupt_source_leaves_no_cache_and_keeps_existing_outputs(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    data = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[5] ^= 0x40
    data.write_bytes(raw)
    with pytest.raises(Gpt2LoadError, match="CRC32C"):
        load_gpt2(d, device="cpu")
    assert sorted(os.listdir(d)) == sorted(os.listdir(OPENAI_TINY))  # no cache, no temp files


def test_failed_export_does_not_replace_existing_output(tmp_path):
    _, model = pair()
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous contents")
    model.trf_blocks[0].att.W_query.weight.data = torch.zeros(3, 3)  # wrong shape: the export must fail
    with pytest.raises(Gpt2LoadError):
        export(model, "safetensors", out)
    assert out.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_bfloat16_load_is_close_to_float32(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    ref = logits(load_gpt2(d, device="cpu"))
    half = load_gpt2(d, device="cpu", dtype="bfloat16")
    assert half.tok_emb.weight.dtype == torch.bfloat16
    assert_tied(half)
    torch.testing.assert_close(logits(half).float(), ref, rtol=0.05, atol=0.05)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(Gpt2LoadError, match=r"unknown model 'gpt3'.*124M, 355M, 774M, 1558M.*gpt2-medium"):
        load_gpt2("gpt3")


def test_unknown_device_and_dtype(tmp_path):
    d = copy_fixture("openai-tiny", tmp_path)
    with pytest.raises(Gpt2LoadError, match="device"):
        load_gpt2(d, device="tpu")
    with pytest.raises(Gpt2LoadError, match="dtype"):
        load_gpt2(d, device="cpu", dtype="int8")


def test_folder_without_a_model(tmp_path):
    with pytest.raises(Gpt2LoadError, match="holds no model"):
        load_gpt2(tmp_path)
    with pytest.raises(Gpt2LoadError, match="does not exist"):
        load_gpt2(tmp_path / "nope")


def test_streamed_conversion_equals_in_memory_conversion(tmp_path):
    from gpt2load.formats.names import convert_tensors
    from gpt2load.formats.stfile import mmap_tensors

    d = copy_fixture("openai-tiny", tmp_path)
    in_memory = dict(convert_tensors(TFCheckpoint(d), OPENAI, open_source(d).cfg, "fixture"))
    load_gpt2(d, device="cpu")  # writes the cache tensor by tensor
    streamed = mmap_tensors(cache_file(open_source(d)))
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in in_memory)


def test_mmap_loaded_weights_are_writable_without_touching_the_file(tmp_path):
    _, model = pair()
    export(model, "safetensors", tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    back = load_gpt2(tmp_path / "m.safetensors", device="cpu")
    with torch.no_grad():
        back.tok_emb.weight.add_(1.0)  # training writes into the weights: copy-on-write pages
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert torch.equal(back.out_head.weight, back.tok_emb.weight)


def test_loaded_qkv_weights_lie_back_to_back_so_decoding_fuses_them_without_a_copy(tmp_path):
    _, model = pair()
    export(model, "safetensors", tmp_path / "m.safetensors")
    back = load_gpt2(tmp_path / "m.safetensors", device="cpu")
    x = torch.randint(0, 96, (1, 5))
    with torch.inference_mode():  # the stock attention module's fast path stacks q/k/v once
        back(x)
        model(x)
    att = back.trf_blocks[1].att
    fused_w, fused_b = (s.value for s in att.backend._fused[att][:2])  # (the backend load_gpt2 handed it)
    assert fused_w.data_ptr() == att.W_query.weight.data_ptr()  # an alias of the loaded memory, not a copy
    assert torch.equal(fused_w, torch.cat([att.W_query.weight, att.W_key.weight, att.W_value.weight]))
    assert torch.equal(fused_b, torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias]))
    own = model.trf_blocks[1].att
    copied = own.backend._fused[own][0].value  # built in memory: separate storages, stacked by copying
    assert copied.data_ptr() != model.trf_blocks[1].att.W_query.weight.data_ptr()
    assert torch.equal(copied, fused_w)
    with torch.no_grad():
        back.trf_blocks[1].att.W_key.weight.add_(1.0)  # a change in place is seen by the alias
    assert torch.equal(fused_w[32:64], att.W_key.weight)
