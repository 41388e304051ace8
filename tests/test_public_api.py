"""The public API as the README shows it: every name resolves to what the README says, and each is called once."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from helpers import TOKENIZER_DIR

import gpt2load
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1)


def readme_names() -> set[str]:
    """Names the README uses as `gpt2load.NAME(` or in `from gpt2load import A, B`."""
    names = set(re.findall(r"\bgpt2load\.([A-Za-z_]\w*)\(", README))
    for group in re.findall(r"from gpt2load import ([\w, ]+)", README):
        names.update(n.strip() for n in group.split(",") if n.strip())
    return names


def test_every_name_in_the_readme_is_public_and_no_module_shadows_a_function():
    names = readme_names()
    assert {"load_gpt2", "generate", "export", "train", "download", "left_pad"} <= names
    for name in sorted(names):
        assert name in gpt2load.__all__, name
        assert callable(getattr(gpt2load, name)), name
    for name in gpt2load.__all__:
        # `import gpt2load.generate as g` must not silently give something else than gpt2load.generate
        assert importlib.util.find_spec(f"gpt2load.{name}") is None, f"module gpt2load.{name} shadows the function"


def test_the_readme_functions_run_on_a_tiny_model(tmp_path):
    torch.manual_seed(0)
    gpt2load.save_model(GPTModel(CFG), tmp_path / "tiny", TOKENIZER_DIR)
    model = gpt2load.load_gpt2(tmp_path / "tiny", device="cpu")
    tok = gpt2load.load_tokenizer(tmp_path / "tiny")
    idx = torch.tensor([tok.encode("Every effort moves you")])

    out = gpt2load.generate(model, idx, max_new_tokens=3, context_size=32)
    assert out.shape == (1, idx.shape[1] + 3) and torch.equal(out[:, : idx.shape[1]], idx)
    assert len(list(gpt2load.generate_stream(model, idx, max_new_tokens=3))) == 3
    beams = gpt2load.beam_search(model, idx, max_new_tokens=3, num_beams=2)
    assert beams.sequences.shape[0] == 1 and torch.equal(beams.sequences[0, : idx.shape[1]], idx[0])
    done = gpt2load.complete(model, tok, "Hello", max_new_tokens=2)
    assert done["prompt_ids"] == tok.encode("Hello") and 1 <= len(done["completions"][0]["token_ids"]) <= 2
    padded, mask = gpt2load.left_pad([[1, 2, 3], [4]])
    assert padded.shape == mask.shape == (2, 3) and mask.tolist() == [[1, 1, 1], [0, 0, 1]]

    x = torch.randint(0, CFG.vocab_size, (2, 8))
    y = torch.full_like(x, -100)
    y[:, :4] = x[:, 1:5]
    loss = gpt2load.evaluate(model, [(x, y)])
    assert isinstance(loss, float) and loss > 0

    written = gpt2load.export(model, "pth", tmp_path / "book.pth")
    assert Path(written).is_file()
    names = [name for name, _ in gpt2load.iter_tensors(tmp_path / "tiny", layout="hf")]
    assert "transformer.h.0.attn.c_attn.weight" in names
