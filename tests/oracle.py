"""The reference implementation: transformers' GPT2LMHeadModel, and the same weights in a GPTModel."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2load.fast.backend import accelerate
from gpt2load.fast.registry import Kernels
from gpt2load.formats.names import HF, convert_tensors, strip_hf_prefix
from gpt2load.model.build import model_from_tensors
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.settings import KernelSettings

TINY = GPTConfig(vocab_size=96, context_length=64, emb_dim=32, n_heads=4, n_layers=2)


def hf_config(cfg: GPTConfig) -> GPT2Config:
    """transformers' GPT2Config for cfg, dropout off, eos/bos the last token id."""
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.emb_dim,
        n_head=cfg.n_heads,
        n_layer=cfg.n_layers,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=cfg.vocab_size - 1,
        eos_token_id=cfg.vocab_size - 1,
    )


def hf_model(cfg: GPTConfig = TINY, seed: int = 0) -> GPT2LMHeadModel:
    """A randomly initialised transformers GPT-2 of cfg's shape, in eval mode, with nonzero biases."""
    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg)
    model = GPT2LMHeadModel(hf_cfg)
    with torch.no_grad():  # default init has zero biases and unit LayerNorms, which hide mapping mistakes
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("wte.weight"):
                p.normal_(0, 0.5)  # larger logits, so greedy choices are not near-ties
    return model.eval()


def gpt_from_hf(model: GPT2LMHeadModel, cfg: GPTConfig = TINY) -> GPTModel:
    """The same weights in a GPTModel, via the Hugging Face name map, with the default backend (as `load_gpt2`
    hands its models)."""
    items = ((strip_hf_prefix(k), v.detach().clone()) for k, v in model.state_dict().items())
    return accelerate(model_from_tensors(cfg, convert_tensors(items, HF, cfg, "transformers model"), device="cpu"))


def pair(cfg: GPTConfig = TINY, seed: int = 0) -> tuple[GPT2LMHeadModel, GPTModel]:
    hf = hf_model(cfg, seed)
    return hf, gpt_from_hf(hf, cfg)


def with_kernels(model: torch.nn.Module, **settings) -> Kernels:
    """Hand `model` a Kernels of its own with these settings (fixed choices, nothing measured by other tests);
    returns it, so a test can read which kernels ran."""
    kernels = Kernels(KernelSettings(**settings))
    accelerate(model, kernels)
    return kernels
