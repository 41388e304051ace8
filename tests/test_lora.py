"""LoRA: a fresh adapter changes nothing, only adapters train, merging keeps the logits, bad settings fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpt2load.errors import Gpt2LoadError
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.model.lora import (
    LinearWithLoRA,
    add_lora,
    base_state,
    load_adapters,
    lora_settings,
    lora_state,
    merge_lora,
    save_adapters,
    without_adapters,
)

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2)


def tiny(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(CFG).eval()


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(seed))


def test_fresh_adapters_change_nothing_and_wrap_the_defaults():
    model = tiny()
    x = batch()
    before = model(x)
    trainable = add_lora(model, rank=4, alpha=8)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    assert wrapped == {
        f"trf_blocks.{i}.{p}"
        for i in range(2)
        for p in ("att.W_query", "att.W_key", "att.W_value", "att.out_proj", "ff.layers.0", "ff.layers.2")
    }
    assert torch.equal(model(x), before)  # B starts at zero
    assert all(".lora." in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * 6 * 2
    assert lora_settings(model)["rank"] == 4


def train_steps(model: GPTModel, params, steps: int = 30) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = batch()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_only_adapters_change_and_merged_equals_unmerged():
    model = tiny()
    frozen_before = {k: v.clone() for k, v in base_state(model).items()}
    losses = train_steps(model, add_lora(model, rank=4, alpha=2))
    assert losses[-1] < losses[0] - 0.1
    for k, v in base_state(model).items():
        assert torch.equal(v, frozen_before[k]), k
    assert all(v.abs().sum() > 0 for k, v in lora_state(model).items() if k.endswith(".B"))
    x = batch(5)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merged = model(x)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert set(model.state_dict()) == set(GPTModel(CFG).state_dict())  # a plain GPTModel again
    assert not torch.equal(merged, tiny()(x))  # the adapters' training is in the weights
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_new_head_trains_and_head_target_needs_an_untied_head():
    model = tiny()
    with pytest.raises(Gpt2LoadError, match="tied"):
        add_lora(model, 2, 4, targets="head")
    model.out_head = nn.Linear(16, 2)
    trainable = add_lora(model, 2, 4, targets="query,value")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"out_head.weight", "out_head.bias"} <= names
    assert len(trainable) == 2 * 2 * 2 + 2


def test_a_new_head_can_take_an_adapter_itself():
    model = tiny()
    model.out_head = nn.Linear(16, 3)
    x = batch()
    before = model(x)
    add_lora(model, 2, 4, targets="attn,head")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"out_head.lora.A", "out_head.lora.B"} <= names and "out_head.linear.weight" not in names
    assert model.out_head.out_features == 3
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)
    merge_lora(model)
    assert isinstance(model.out_head, nn.Linear)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"rank": 0}, "--lora-rank"),
        ({"rank": -3}, "--lora-rank"),
        ({"rank": 4, "alpha": 0}, "--lora-alpha"),
        ({"rank": 4, "targets": "attn,mlp"}, "--lora-targets"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, needle):
    model = tiny()
    with pytest.raises(Gpt2LoadError, match=needle):
        add_lora(model, **kwargs)
    assert not any(isinstance(m, LinearWithLoRA) for m in model.modules())


def test_adding_twice_is_refused():
    model = tiny()
    add_lora(model, 2)
    with pytest.raises(Gpt2LoadError, match="already"):
        add_lora(model, 2)


def test_adapters_save_and_load_onto_a_fresh_model(tmp_path):
    model = tiny()
    train_steps(model, add_lora(model, rank=3, alpha=4, targets="attn"), steps=5)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    with without_adapters(model):
        assert not lora_settings(model)
        base = {k: v.clone() for k, v in model.state_dict().items()}
    assert lora_settings(model)["rank"] == 3
    fresh = tiny()
    fresh.load_state_dict(base)
    load_adapters(fresh, path)
    x = batch(7)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert lora_settings(fresh) == lora_settings(model)
    other = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=8, n_heads=2, n_layers=2))
    with pytest.raises(Gpt2LoadError, match="does not fit"):
        load_adapters(other, path)
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(Gpt2LoadError, match="not a readable LoRA adapter file"):
        load_adapters(tiny(), tmp_path / "bad.safetensors")


def test_the_books_appendix_e_count():
    """The book wraps every Linear of the 124M classifier at rank 16: 2,666,528 trainable parameters."""
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_name("124M"))
        model.out_head = nn.Linear(768, 2)
        trainable = add_lora(model, 16, 16, targets="attn,ff,head")
    assert sum(p.numel() for p in trainable) == 2_666_528
