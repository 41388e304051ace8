"""GPTModel against transformers' GPT2LMHeadModel on the same weights, for both source layouts."""

import numpy as np
import pytest
import torch
from helpers import OPENAI_TINY, copy_fixture
from oracle import TINY, hf_config, hf_model, pair
from transformers import GPT2LMHeadModel

from gpt2load.load import load_gpt2
from gpt2load.model.build import empty_model, model_from_tensors
from gpt2load.model.config import GPTConfig, read_hparams
from gpt2load.model.gpt import GPTModel, param_count

SHAPES = [
    TINY,
    GPTConfig(vocab_size=200, context_length=128, emb_dim=48, n_heads=6, n_layers=3),
    GPTConfig(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12),  # the real 124M
]


def greedy(step, idx: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding by full recomputation: the simplest possible reference loop."""
    for _ in range(n):
        idx = torch.cat([idx, step(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0].tolist()


@pytest.mark.parametrize("cfg", SHAPES, ids=["tiny", "small", "124M"])
def test_logits_and_greedy_tokens_match_transformers(cfg):
    hf, ours = pair(cfg, seed=1)
    torch.manual_seed(2)
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert greedy(ours, x[:1, :5], 8) == greedy(lambda i: hf(i).logits, x[:1, :5], 8)


def _hf_name(tf_name: str) -> str:
    """model/h3/attn/c_attn/w -> transformer.h.3.attn.c_attn.weight; model/wte -> transformer.wte.weight."""
    parts = tf_name.split("/")[1:]
    if len(parts) == 1:
        return f"transformer.{parts[0]}.weight"
    *path, leaf = parts
    if path[0].startswith("h"):
        path = ["h", path[0][1:], *path[1:]]
    return "transformer." + ".".join(path) + "." + {"g": "weight", "w": "weight", "b": "bias"}[leaf]


def _hf_from_tf_oracle() -> GPT2LMHeadModel:
    """transformers loaded with TensorFlow's own values of the fixture, renamed by hand (not via our tables)."""
    cfg = read_hparams(OPENAI_TINY / "hparams.json")
    hf = GPT2LMHeadModel(hf_config(cfg))
    tf = np.load(OPENAI_TINY / "expected.npz")
    state = {}
    for name in tf.files:
        key = _hf_name(name)
        value = torch.from_numpy(tf[name])
        state[key] = value[0] if value.dim() == 3 else value  # OpenAI's Conv1D weights carry a leading 1
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("attn.bias") or k == "lm_head.weight" for k in missing)
    hf.tie_weights()
    return hf.eval()


def test_openai_layout_matches_transformers(tmp_path):
    hf = _hf_from_tf_oracle()
    ours = load_gpt2(copy_fixture("openai-tiny", tmp_path), device="cpu")
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)
        assert greedy(ours, x[:1, :4], 10) == greedy(lambda i: hf(i).logits, x[:1, :4], 10)


def test_book_names_and_tied_head():
    hf, model = pair()
    keys = set(model.state_dict())
    for name in [
        "tok_emb.weight",
        "pos_emb.weight",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.0.att.W_key.bias",
        "trf_blocks.1.att.out_proj.weight",
        "trf_blocks.0.ff.layers.0.weight",
        "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale",
        "trf_blocks.0.norm2.shift",
        "final_norm.scale",
        "out_head.weight",
    ]:
        assert name in keys, name
    assert "out_head.bias" not in keys
    assert model.out_head.weight is model.tok_emb.weight
    assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert param_count(model) == TINY.n_params == sum(p.numel() for p in hf.parameters())
    # No dense context x context mask, in the state or in memory (SDPA masks causally by itself).
    assert not any(k.endswith(".mask") for k in keys) and not list(model.buffers())


def test_state_dict_loads_strict_into_a_fresh_model():
    _, model = pair()
    fresh = GPTModel(TINY)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.out_head.weight is fresh.tok_emb.weight


def test_book_style_config_dict():
    model = GPTModel(
        {
            "vocab_size": 96,
            "context_length": 64,
            "emb_dim": 32,
            "n_heads": 4,
            "n_layers": 2,
            "drop_rate": 0.1,
            "qkv_bias": True,
        }
    )
    assert model.cfg.drop_rate == 0.1 and model.trf_blocks[0].att.W_query.bias is not None


def test_kv_cache_chunks_equal_full_forward():
    _, model = pair()
    x = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        parts = [model(x[:, a:b], cache=cache) for a, b in [(0, 11), (11, 12), (12, 20), (20, 30)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_meta_construction_allocates_nothing():
    big = GPTConfig.from_name("1558M")
    model = empty_model(big)
    assert all(p.is_meta for p in model.parameters())
    assert param_count(model) == big.n_params == 1_557_611_200


def test_hf_model_with_an_untied_different_head_loads_untied():
    from gpt2load.formats.layouts import _untied_hf_head
    from gpt2load.formats.names import HF, convert_tensors, strip_hf_prefix

    hf = hf_model()
    state = {strip_hf_prefix(k): v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = state["wte.weight"] + 1
    tensors = dict(convert_tensors(state.items(), HF, TINY, "x"))
    lm = _untied_hf_head(state)
    assert lm is not None and torch.equal(lm, state["wte.weight"] + 1)
    model = model_from_tensors(TINY, [*tensors.items(), ("out_head.weight", lm)], device="cpu")
    assert not model.head_tied and torch.equal(model.out_head.weight, lm)
    assert torch.equal(model.tok_emb.weight, state["wte.weight"])
