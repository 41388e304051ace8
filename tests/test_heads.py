"""Heads by identity and the book's own files: what a model holds is what gets saved, exported and loaded."""

import json

import pytest
import torch
from book_gpt import BOOK_TINY, BookGPT, book_model
from helpers import assert_clean_error, run_cli
from oracle import TINY, pair
from torch import nn
from transformers import GPT2LMHeadModel

from gpt2load import Gpt2LoadError, GPTModel, export, load_gpt2, save_model
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import config_from_book_dict

X = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def logits(model, x=X):
    with torch.no_grad():
        return model(x)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_tie_and_untie_round_trip():
    _, model = pair()
    assert model.head_tied and model.out_head.weight is model.tok_emb.weight
    model.untie_head()
    assert not model.head_tied and torch.equal(model.out_head.weight, model.tok_emb.weight)
    with torch.no_grad():
        model.out_head.weight.add_(1.0)  # a copy: the embedding keeps its values
    assert not torch.equal(model.out_head.weight, model.tok_emb.weight)
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))
    model.tie_head()
    assert model.out_head.weight is model.tok_emb.weight
    assert not model.is_derived("tok_emb.weight") and model.is_derived("out_head.weight")
    model.out_head = nn.Linear(TINY.emb_dim, 2)
    with pytest.raises(Gpt2LoadError, match="cannot share tok_emb"):
        model.tie_head()


@pytest.mark.parametrize("bias", [True, False])
def test_a_replaced_head_survives_save_load_and_pth(tmp_path, bias):
    _, model = pair()
    model.out_head = nn.Linear(TINY.emb_dim, 2, bias=bias)
    want = logits(model)
    assert want.shape == (1, 8, 2)
    for path in (tmp_path / "own.safetensors", tmp_path / "folder"):
        save_model(model, path)
        back = load_gpt2(path, device="cpu")
        assert back.out_head.weight.shape == (2, TINY.emb_dim) and (back.out_head.bias is not None) == bias
        close(logits(back), want)
    export(model, "pth", tmp_path / "m.pth")
    state = torch.load(tmp_path / "m.pth", weights_only=True)
    assert state["out_head.weight"].shape == (2, TINY.emb_dim) and ("out_head.bias" in state) == bias
    close(logits(load_gpt2(tmp_path / "m.pth", device="cpu", n_heads=TINY.n_heads)), want)
    with pytest.raises(Gpt2LoadError, match="GPT2LMHeadModel cannot hold"):
        export(model, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_an_untied_head_equal_to_the_embedding_stays_untied_in_gpt2loads_files(tmp_path):
    _, model = pair()
    model.untie_head()  # values still equal: only the file's record can say "untied"
    save_model(model, tmp_path / "m.safetensors")
    back = load_gpt2(tmp_path / "m.safetensors", device="cpu")
    assert not back.head_tied and torch.equal(back.out_head.weight, back.tok_emb.weight)
    save_model(pair()[1], tmp_path / "tied.safetensors")
    assert load_gpt2(tmp_path / "tied.safetensors", device="cpu").head_tied


def test_load_state_dict_follows_the_data_and_never_overwrites_tok_emb():
    _, model = pair()
    untied = {k: v.clone() for k, v in model.state_dict().items()}
    untied["out_head.weight"] = untied["tok_emb.weight"] + 0.5
    untied["trf_blocks.0.att.mask"] = torch.ones(3, 3)  # the book's buffers: ignored
    fresh = GPTModel(TINY)
    fresh.load_state_dict(untied, strict=True)
    assert not fresh.head_tied
    assert torch.equal(fresh.tok_emb.weight, untied["tok_emb.weight"])
    assert torch.equal(fresh.out_head.weight, untied["out_head.weight"])
    fresh.load_state_dict(model.state_dict(), strict=True)  # equal values: tied again
    assert fresh.head_tied and torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)
    stored = model.stored_state()  # a tied head is stored once
    assert "out_head.weight" not in stored
    GPTModel(TINY).load_state_dict(stored, strict=True)


def book_state(**overrides):
    book = book_model(**overrides)
    return book, {k: v.clone() for k, v in book.state_dict().items()}


def test_the_books_chapter5_model_loads_with_config_read_off_the_tensors(tmp_path):
    book, state = book_state()  # qkv_bias False, context 256, untied head, drop_rate 0.1
    want = logits(book)
    torch.save(state, tmp_path / "model.pth")
    model = load_gpt2(tmp_path / "model.pth", device="cpu")
    cfg = model.cfg
    assert (cfg.context_length, cfg.n_heads, cfg.qkv_bias, cfg.drop_rate) == (256, 12, False, 0.0)
    assert not model.head_tied and model.trf_blocks[0].att.W_query.bias is None
    close(logits(model), want)
    assert load_gpt2(tmp_path / "model.pth", device="cpu", dropout=0.1).drop_emb.p == 0.1
    # The chapter-5 training checkpoint: the model part loads, the optimizer state is not used.
    opt = torch.optim.AdamW(book.parameters(), lr=1e-4)
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt.state_dict()}, tmp_path / "ck.pth")
    close(logits(load_gpt2(tmp_path / "ck.pth", device="cpu")), want)
    # transformers' GPT-2 has q/k/v biases: zeros stand in for the ones the book's config leaves out.
    export(model, "hf", tmp_path / "hf")
    close(GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()(X).logits.detach(), want)
    # The book's own config dict and load_state_dict, strict: the same model.
    ours = GPTModel(BOOK_TINY)
    ours.load_state_dict(state, strict=True)
    assert not ours.head_tied
    close(logits(ours.eval()), want)


def test_untied_book_state_round_trips_through_convert_to_pth_and_hf(tmp_path):
    book, state = book_state(qkv_bias=True)
    want = logits(book)
    torch.save(state, tmp_path / "ft.pth")
    proc = run_cli("convert", "--model", str(tmp_path / "ft.pth"), "--to", "pth", "--out", str(tmp_path / "out.pth"))
    assert proc.returncode == 0, proc.stderr
    again = BookGPT({**BOOK_TINY, "qkv_bias": True})
    again.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
    close(logits(again.eval()), want)
    proc = run_cli("convert", "--model", str(tmp_path / "ft.pth"), "--to", "hf", "--out", str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    close(logits(hf).logits, want)
    close(logits(load_gpt2(tmp_path / "hf", device="cpu")), want)  # and back, untied


def test_a_width_without_a_preset_needs_n_heads(tmp_path):
    book, state = book_state(emb_dim=64, n_heads=4)
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(Gpt2LoadError, match="n_heads"):
        load_gpt2(tmp_path / "small.pth", device="cpu")
    close(logits(load_gpt2(tmp_path / "small.pth", device="cpu", n_heads=4)), logits(book))
    proc = run_cli("info", str(tmp_path / "small.pth"))
    assert_clean_error(proc, "n_heads")


def test_stored_qkv_biases_are_never_dropped_by_a_config_without_them():
    _, state = book_state(qkv_bias=True)
    model = GPTModel(config_from_book_dict({**BOOK_TINY, "qkv_bias": False}))
    with pytest.raises(RuntimeError, match="W_query.bias"):
        model.load_state_dict(state, strict=True)


def test_saving_part_of_a_loaded_model_writes_only_that_part(tmp_path):
    _, model = pair()
    save_model(model, tmp_path / "m.safetensors")
    back = load_gpt2(tmp_path / "m.safetensors", device="cpu")
    torch.save(back.final_norm.state_dict(), tmp_path / "part.pth")
    full = (tmp_path / "m.safetensors").stat().st_size
    assert (tmp_path / "part.pth").stat().st_size < 4096 < full // 10
    assert back.final_norm.scale.untyped_storage().nbytes() == TINY.emb_dim * 4


def test_exports_write_the_models_real_drop_rate(tmp_path):
    _, model = pair()
    save_model(model, tmp_path / "m.safetensors")
    model = load_gpt2(tmp_path / "m.safetensors", device="cpu", dropout=0.1)
    assert model.cfg.drop_rate == 0.1 and model.trf_blocks[0].drop_shortcut.p == 0.1
    export(model, "hf", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["resid_pdrop"] == 0.1
    assert load_gpt2(tmp_path / "m.safetensors", device="cpu").drop_emb.p == 0.0


def test_pth_export_refuses_a_context_whose_book_mask_would_be_huge(tmp_path):
    """The book's layout carries a dense context x context mask: a 30000-token context would write 3.4 GiB."""
    model = GPTModel(GPTConfig(vocab_size=64, context_length=30000, emb_dim=8, n_heads=2, n_layers=1))
    with pytest.raises(Gpt2LoadError, match="30000x30000"):
        export(model, "pth", tmp_path / "big.pth")
    assert not (tmp_path / "big.pth").exists()
