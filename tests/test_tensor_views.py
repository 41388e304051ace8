"""Tensor views show the model load_gpt2 would build (adapters, heads, int8), and exports speak up about NaN/inf.

transformers is the oracle for the "hf" views: its GPT2LMHeadModel and GPT2ForSequenceClassification, filled
from the view with load_state_dict(strict=True), must compute what load_gpt2's model computes.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error, run_cli
from oracle import TINY, hf_config, pair
from test_heads import X, close, logits
from torch import nn
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from gpt2load import Gpt2LoadError, export, iter_tensors, load_gpt2, save_model
from gpt2load.formats.exports import save_finetuned
from gpt2load.formats.relayout import NonFiniteWeightsWarning
from gpt2load.info import info
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.model.lora import add_lora, lora_modules, lora_state, merge_lora
from gpt2load.model.quant import quantize_model
from gpt2load.tensors import tensor_table


def same_as_table(path, layout="book", **kw):
    """iter_tensors' (name, shape, dtype) equal tensor_table's, which reads headers only; the tensors."""
    got = dict(iter_tensors(path, layout, **kw))
    table = tensor_table(str(path), layout, **kw)
    assert len(table) == len(got)  # no name twice
    assert {r["name"]: (tuple(r["shape"]), r["dtype"], r["bytes"]) for r in table} == {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), v.nbytes) for k, v in got.items()
    }
    return got


def hf_from_view(view: dict, cls=GPT2LMHeadModel, **cfg):
    """transformers' model holding exactly the tensors of an "hf" view (strict: none missing, none extra)."""
    config = hf_config(TINY)
    for k, v in cfg.items():
        setattr(config, k, v)
    model = cls(config).eval()
    state = dict(view)
    if "lm_head.weight" not in state and cls is GPT2LMHeadModel:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: GPT-2's files store it once
    model.load_state_dict(state, strict=True)
    return model


def hf_logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


@pytest.fixture
def lora_folder(tmp_path):
    """A model saved as fine-tuning's --no-merge saves it: base weights + adapters.safetensors, with trained
    (nonzero) adapters on attention, feed-forward and an untied head."""
    _, model = pair()
    model.untie_head()
    with torch.no_grad():
        model.out_head.weight.mul_(0.5)
    torch.manual_seed(1)
    add_lora(model, 4, targets="attn,ff,head")
    for m in lora_modules(model).values():
        with torch.no_grad():
            m.lora.B.normal_(0, 0.05)
    want = logits(model)
    return save_finetuned(model, tmp_path / "lora", None, {}, merge=False), want


def test_a_no_merge_lora_folder_is_viewed_merged_by_default(lora_folder):
    folder, want = lora_folder
    loaded = load_gpt2(folder, device="cpu")
    close(logits(loaded), want)  # the model the view must describe: adapters on
    merged_model = merge_lora(copy.deepcopy(loaded))
    torch.testing.assert_close(logits(merged_model), want, rtol=0, atol=1e-4)  # merging rounds a little
    merged = merged_model.stored_state()
    book = same_as_table(folder)
    assert book.keys() == merged.keys()
    for k, v in merged.items():
        close(book[k], v)
    base = loaded.trf_blocks[0].att.W_query.linear.weight  # what the view showed before: adapters dropped
    assert not torch.allclose(book["trf_blocks.0.att.W_query.weight"], base, atol=1e-3)
    view = same_as_table(folder, "hf")
    assert "lm_head.weight" in view
    close(hf_logits(hf_from_view(view, tie_word_embeddings=False)), logits(merged_model))


def test_a_no_merge_lora_folder_lists_its_adapters_on_request(lora_folder):
    folder, _ = lora_folder
    loaded = load_gpt2(folder, device="cpu")
    listed = same_as_table(folder, adapters="list")
    adapters = lora_state(loaded)
    base = {k: v for k, v in listed.items() if ".lora." not in k}
    assert {k: v for k, v in listed.items() if ".lora." in k}.keys() == adapters.keys()
    assert all(torch.equal(listed[k], v) for k, v in adapters.items())
    assert base.keys() == dict(iter_tensors(folder)).keys()
    assert torch.equal(base["trf_blocks.1.ff.layers.0.weight"], loaded.trf_blocks[1].ff.layers[0].linear.weight)
    with pytest.raises(Gpt2LoadError, match="only layout book names"):
        next(iter_tensors(folder, "hf", adapters="list"))
    with pytest.raises(Gpt2LoadError, match="unknown adapters mode 'drop'"):
        next(iter_tensors(folder, adapters="drop"))
    assert "rank 4" in info(str(folder))["lora_adapters"]


def test_an_untied_head_is_named_in_each_layout_or_refused_in_one_line(tmp_path):
    _, model = pair()
    model.untie_head()
    with torch.no_grad():
        model.out_head.weight.add_(0.25)
    save_model(model, tmp_path / "untied")
    book = same_as_table(tmp_path / "untied")
    assert torch.equal(book["out_head.weight"], model.out_head.weight)
    view = same_as_table(tmp_path / "untied", "hf")
    assert torch.equal(view["lm_head.weight"], model.out_head.weight)
    close(hf_logits(hf_from_view(view, tie_word_embeddings=False)), logits(model))
    for path in (tmp_path / "untied", tmp_path / "untied.pth"):
        if path.suffix == ".pth":
            export(model, "pth", path)
        with pytest.raises(Gpt2LoadError, match="OpenAI's TensorFlow layout has no name for one.*use layout book"):
            next(iter_tensors(path, "openai", n_heads=TINY.n_heads))


def test_a_book_pth_with_a_tied_head_views_in_every_layout(tmp_path):
    _, model = pair()
    export(model, "pth", tmp_path / "tied.pth")  # the book's state_dict: out_head.weight stored, shared
    assert "out_head.weight" in torch.load(tmp_path / "tied.pth", weights_only=True)
    book = same_as_table(tmp_path / "tied.pth", n_heads=TINY.n_heads)
    assert "out_head.weight" not in book  # load_gpt2 ties it: one tensor, tok_emb
    view = same_as_table(tmp_path / "tied.pth", "hf", n_heads=TINY.n_heads)
    close(hf_logits(hf_from_view(view)), logits(model))
    openai = same_as_table(tmp_path / "tied.pth", "openai", n_heads=TINY.n_heads)
    assert torch.equal(openai["model/wte"], model.tok_emb.weight)


@pytest.mark.parametrize("bias", [False, True])
def test_a_classifier_head_is_hfs_score_or_refused_when_it_has_a_bias(tmp_path, bias):
    _, model = pair()
    torch.manual_seed(2)
    model.out_head = nn.Linear(TINY.emb_dim, 2, bias=bias)
    save_model(model, tmp_path / "clf.safetensors")
    book = same_as_table(tmp_path / "clf.safetensors")
    assert ("out_head.bias" in book) == bias and book["out_head.weight"].shape == (2, TINY.emb_dim)
    if bias:
        with pytest.raises(Gpt2LoadError, match=r"head \[2, 32\] with a bias.*use layout book"):
            next(iter_tensors(tmp_path / "clf.safetensors", "hf"))
        return
    view = same_as_table(tmp_path / "clf.safetensors", "hf")
    assert "score.weight" in view and "lm_head.weight" not in view
    clf = hf_from_view(view, GPT2ForSequenceClassification, num_labels=2, pad_token_id=None)
    close(hf_logits(clf), logits(model)[:, -1])  # transformers scores the last token, as the book does


def test_int8_files_are_viewed_as_int8_with_their_scales(tmp_path):
    _, model = pair()
    q = quantize_model(copy.deepcopy(model))
    save_model(q, tmp_path / "q.safetensors")
    table = {r["name"]: r for r in tensor_table(str(tmp_path / "q.safetensors"))}
    assert table["trf_blocks.0.att.W_query.qweight"]["dtype"] == "int8"
    assert table["trf_blocks.0.att.W_query.weight_scale"] == {
        "name": "trf_blocks.0.att.W_query.weight_scale",
        "shape": [TINY.emb_dim],
        "dtype": "float32",
        "bytes": 4 * TINY.emb_dim,
    }
    assert not any(n.endswith(".weight") and len(r["shape"]) == 2 and n != "pos_emb.weight" for n, r in table.items())
    view = same_as_table(tmp_path / "q.safetensors")
    state = load_gpt2(tmp_path / "q.safetensors", device="cpu").stored_state()
    assert view.keys() == state.keys() and all(torch.equal(view[k], v) for k, v in state.items())
    with pytest.raises(Gpt2LoadError, match="int8 weights, which only layout book names"):
        next(iter_tensors(tmp_path / "q.safetensors", "hf"))
    assert info(str(tmp_path / "q.safetensors"))["dtype"].startswith("int8")


def test_cli_info_tensors_shows_the_head_adapters_and_refuses_in_one_line(lora_folder, tmp_path):
    folder, _ = lora_folder
    proc = run_cli("info", str(folder), "--tensors", "--layout", "hf")
    assert proc.returncode == 0, proc.stderr
    assert "lm_head.weight" in proc.stdout and ".lora." not in proc.stdout
    rows = json.loads(run_cli("info", str(folder), "--tensors", "--adapters", "list", "--json").stdout)
    assert {"trf_blocks.0.att.W_query.lora.A", "out_head.lora.B"} <= {r["name"] for r in rows}
    assert_clean_error(run_cli("info", str(folder), "--tensors", "--layout", "openai"), "OpenAI's TensorFlow layout")


def nan_model(cfg: GPTConfig = TINY) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.trf_blocks[0].ff.layers[0].weight[0, :3] = float("nan")
        model.final_norm.shift[1] = float("inf")
    return model


GGUF_LM = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=1)
EXPORTS = [("safetensors", "m.safetensors"), ("safetensors", "folder"), ("hf", "hf"), ("pth", "m.pth")]


@pytest.mark.parametrize("to,out", [*EXPORTS, ("gguf", "m.gguf")])
def test_every_export_warns_about_nan_weights_or_refuses_with_strict(tmp_path, to, out):
    if to == "gguf":
        pytest.importorskip("gguf", reason="the gguf package is not installed: pip install '.[gguf]'")
    model = nan_model(GGUF_LM if to == "gguf" else TINY)
    with pytest.raises(
        Gpt2LoadError,
        match=r"tensor (blk.0.ffn_up.weight \()?trf_blocks\.0\.ff\.layers\.0\.weight\)? has 3 NaN or infinite values",
    ):
        export(model, to, tmp_path / out, TOKENIZER_DIR, strict=True)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.warns(NonFiniteWeightsWarning) as caught:
        export(model, to, tmp_path / out, TOKENIZER_DIR, dtype="f32" if to == "gguf" else None)
    (message,) = [str(w.message) for w in caught]
    assert "4 non-finite weights in 2 tensors" in message and "trf_blocks.0.ff.layers.0.weight" in message
    assert (tmp_path / out).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)  # a finite model: not a word
        export(GPTModel(GGUF_LM if to == "gguf" else TINY), to, tmp_path / f"ok{out}", TOKENIZER_DIR)


@pytest.mark.parametrize("to", ["safetensors", "gguf"])
def test_float16_overflow_counts_as_non_finite(tmp_path, to):
    if to == "gguf":
        pytest.importorskip("gguf", reason="the gguf package is not installed: pip install '.[gguf]'")
    torch.manual_seed(0)
    model = GPTModel(GGUF_LM).eval()
    with torch.no_grad():
        model.trf_blocks[0].att.out_proj.weight[0, 0] = 1e6  # finite in float32, inf in float16
    out = tmp_path / ("m.gguf" if to == "gguf" else "m.safetensors")
    with pytest.raises(
        Gpt2LoadError, match=r"out_proj.weight\)? has 1 value beyond float16's range.*export in float32"
    ):
        export(model, to, out, TOKENIZER_DIR, dtype="float16", strict=True)
    assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightsWarning)
        export(model, to, out, TOKENIZER_DIR, dtype="float32")


def test_cli_convert_strict_refuses_nan_weights_in_one_line(tmp_path):
    with pytest.warns(NonFiniteWeightsWarning):
        save_model(nan_model(), tmp_path / "nan.safetensors")
    out = tmp_path / "out.pth"
    args = ("convert", "--model", str(tmp_path / "nan.safetensors"), "--to", "pth", "--out", str(out))
    proc = run_cli(*args, "--strict")
    assert_clean_error(proc, "trf_blocks.0.ff.layers.0.weight", "strict")
    assert not any("out" in p.name for p in tmp_path.iterdir())  # no file, no temp file, no marker
    proc = run_cli(*args)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    warned = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(warned) == 1 and warned[0].startswith("gpt2load: warning: writing 4 non-finite weights"), proc.stderr
