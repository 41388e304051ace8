"""nanoGPT's ckpt.pt: read by content (compiled prefix, bias=False, padded vocabulary) with transformers as the
oracle, written for nanoGPT's sample.py (checked with a nanoGPT-shaped module of the test's own), and refused
in one line when malformed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import add_tokenizer, assert_clean_error, run_cli
from oracle import TINY, pair
from torch import nn

from gpt2load.errors import Gpt2LoadError
from gpt2load.formats.exports import export, save_model
from gpt2load.formats.layouts import open_source
from gpt2load.info import info
from gpt2load.load import load_gpt2

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])


def zero_biases(hf) -> None:
    """A transformers model computing as a bias=False nanoGPT: every bias and LayerNorm shift zero."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.zero_()


def nanogpt_state(hf, *, bias: bool = True, compiled: bool = False) -> dict[str, torch.Tensor]:
    """transformers' weights in nanoGPT's names and nn.Linear layout (lm_head the same tensor as wte)."""
    state = {}
    for k, v in hf.state_dict().items():
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        if k.endswith(".bias") and not bias:
            continue
        state[k] = v.detach().t().contiguous() if k.endswith(CONV1D) else v.detach().clone()
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return {f"_orig_mod.{k}" if compiled else k: v for k, v in state.items()}


def checkpoint(hf, cfg, *, bias: bool = True, compiled: bool = False) -> dict:
    args = {
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_embd": cfg.emb_dim,
        "block_size": cfg.context_length,
        "bias": bias,
        "vocab_size": cfg.vocab_size,
        "dropout": 0.0,
    }
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    config = {"dataset": "openwebtext", "learning_rate": 6e-4, "compile": compiled}
    return {
        "model": nanogpt_state(hf, bias=bias, compiled=compiled),
        "optimizer": optimizer,
        "model_args": args,
        "iter_num": 1234,
        "best_val_loss": torch.tensor(2.5),
        "config": config,
    }


def save(ckpt, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "bias,compiled,vocab,name",
    [
        (True, False, 128, "ckpt.pt"),
        (True, True, 50304, "ckpt.pt"),
        (False, True, 128, "model.pth"),  # recognised by its keys, whatever the suffix
        (False, False, 50304, "weights.bin"),
    ],
)
def test_logits_match_transformers(tmp_path, capsys, bias, compiled, vocab, name):
    cfg = replace(TINY, vocab_size=vocab)  # 96 padded to 128, or GPT-2's 50257 padded to 50304
    hf, _ = pair(cfg, seed=4)
    if not bias:
        zero_biases(hf)
    path = save(checkpoint(hf, cfg, bias=bias, compiled=compiled), tmp_path / name)
    model = load_gpt2(path, device="cpu")
    assert open_source(path).kind == "nanogpt"
    assert model.cfg.vocab_size == vocab and model.cfg.qkv_bias is bias  # padded rows kept
    assert model.head_tied
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf(IDS).logits, atol=1e-5, rtol=1e-5)
    notices = [ln for ln in capsys.readouterr().err.splitlines() if "optimizer" in ln]
    assert len(notices) == 1 and notices[0].startswith("gpt2load: notice:"), notices


def test_info_shows_the_training_state(tmp_path):
    hf, _ = pair(TINY)
    path = save(checkpoint(hf, TINY), tmp_path / "ckpt.pt")
    data = info(str(path))
    assert data["layout"] == "nanogpt" and data["iter_num"] == "1234" and data["best_val_loss"] == "2.5"
    assert json.loads(data["config"])["dataset"] == "openwebtext"
    proc = run_cli("info", str(path))
    assert proc.returncode == 0, proc.stderr
    assert any(ln.startswith("iter_num:") and ln.endswith("1234") for ln in proc.stdout.splitlines())
    tensors = run_cli("info", str(path), "--tensors", "--layout", "hf")
    assert tensors.returncode == 0 and "transformer.h.1.attn.c_attn.weight" in tensors.stdout, tensors.stderr


class NanoBlock(nn.Module):
    """A block with nanoGPT's module names, written for this test from the checkpoint format. (nanoGPT's MLP
    uses exact GELU; GPT-2's tanh form is used here, so the logits compare exactly with GPTModel's.)"""

    def __init__(self, d: int, heads: int, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = NanoNorm(d, bias), NanoNorm(d, bias)
        self.attn = nn.Module()
        self.attn.c_attn, self.attn.c_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn.c_proj(y)
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoNorm(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoGPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, n_embd),
                "wpe": nn.Embedding(block_size, n_embd),
                "h": nn.ModuleList(NanoBlock(n_embd, n_head, bias) for _ in range(n_layer)),
                "ln_f": NanoNorm(n_embd, bias),
            }
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's tie

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def sample_py_load(path: Path) -> tuple[NanoGPT, dict]:
    """What nanoGPT's sample.py does with out_dir/ckpt.pt: weights_only load, the model from model_args, the
    `_orig_mod.` prefix stripped, a strict load_state_dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = NanoGPT(**ckpt["model_args"])
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model.eval(), ckpt


@pytest.mark.parametrize("bias", [True, False])
def test_written_checkpoint_loads_in_nanogpt_and_back(tmp_path, bias):
    cfg = TINY if bias else replace(TINY, qkv_bias=False)
    hf, model = pair(TINY, seed=2)
    if not bias:
        zero_biases(hf)
        src = save(checkpoint(hf, cfg, bias=False), tmp_path / "src.pt")
        model = load_gpt2(src, device="cpu")
    out = export(model, "nanogpt", tmp_path / "out" / "ckpt.pt")
    nano, ckpt = sample_py_load(out)
    assert ckpt["model_args"]["bias"] is bias and ckpt["iter_num"] == 0
    assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()
    back = load_gpt2(out, device="cpu")
    with torch.no_grad():
        want = hf(IDS).logits
        torch.testing.assert_close(nano(IDS), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(IDS), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(model.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # train.py's resume: AdamW over nanoGPT's two groups (matrices decayed, vectors not) takes the state
    params = [p for p in nano.parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    opt = torch.optim.AdamW(groups)
    opt.load_state_dict(ckpt["optimizer"])
    nano(IDS).sum().backward()
    opt.step()


def test_writer_refuses_an_untied_head(tmp_path):
    _, model = pair(TINY)
    model.untie_head()
    with torch.no_grad():
        model.out_head.weight.add_(1.0)
    with pytest.raises(Gpt2LoadError, match="nanoGPT always ties"):
        export(model, "nanogpt", tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    text = str(e.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.mark.parametrize(
    "change,needles",
    [
        (lambda c: c.pop("model_args"), ("no model_args",)),
        (lambda c: c.update(model_args=[1, 2]), ("model_args as a list",)),
        (lambda c: c["model_args"].pop("n_head"), ("lack n_head",)),
        (lambda c: c["model_args"].update(n_layer=10**9), ("n_layers",)),
        (lambda c: c["model_args"].update(bias="yes"), ("bias='yes'",)),
        (lambda c: c["model_args"].update(bias=False), ("bias=false", "holds biases")),
        (lambda c: c.update(model=[1, 2]), ("'model' entry is a list",)),
        (lambda c: c["model"].update(step=3), ("'step' holds a int",)),
    ],
)
def test_malformed_checkpoints_are_one_line(tmp_path, change, needles):
    hf, _ = pair(TINY)
    ckpt = checkpoint(hf, TINY)
    change(ckpt)
    path = save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(Gpt2LoadError) as e:
        open_source(path)
    _one_line(e, str(path), *needles)


def test_wrong_shapes_name_the_tensor(tmp_path):
    hf, _ = pair(TINY)
    ckpt = checkpoint(hf, TINY, compiled=True)
    ckpt["model"]["_orig_mod.transformer.h.1.attn.c_attn.weight"] = torch.zeros(3 * 32, 16)
    path = save(ckpt, tmp_path / "ckpt.pt")
    with pytest.raises(Gpt2LoadError) as e:
        load_gpt2(path, device="cpu")
    _one_line(e, "transformer.h.1.attn.c_attn.weight", str(path))
    assert_clean_error(
        run_cli("generate", "--device", "cpu", "--model", str(path), "--prompt", "A"), "transformer.h.1.attn.c_attn"
    )
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert_clean_error(run_cli("info", str(tmp_path / "list.pt")), "holds a list")


def test_cli_convert_to_nanogpt_then_generate(tmp_path):
    hf, model = pair(TINY, seed=1)
    src = save_model(model, tmp_path / "src", add_tokenizer(tmp_path))
    out = tmp_path / "nano"
    out.mkdir()
    add_tokenizer(out)  # the writer writes ckpt.pt alone (nanoGPT uses tiktoken's gpt2); generate reads these
    proc = run_cli("convert", "--model", str(src), "--to", "nanogpt", "--out", str(out / "ckpt.pt"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    gen = ("generate", "--device", "cpu", "--prompt", "A(Z", "--max-new-tokens", "6", "--json")
    a = run_cli(*gen, "--model", str(out / "ckpt.pt"))
    b = run_cli(*gen, "--model", str(src))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout)["completions"] == json.loads(b.stdout)["completions"]
    assert "optimizer state is ignored" not in a.stderr  # gpt2load's own writer leaves no moments to ignore
