"""One load_gpt2 opens each file once: the safetensors header parsed once per file, the TensorFlow index read
once, a torch file loaded once (counted by wrapping the low-level readers), whatever the layout and cache state."""

from collections import Counter

import pytest
import torch
from helpers import copy_fixture
from oracle import TINY, pair

from gpt2load.formats import stfile, tfcheckpoint
from gpt2load.formats.exports import export
from gpt2load.load import load_gpt2


@pytest.fixture
def opens(monkeypatch, tmp_path):
    """Counts of header parses, TFCheckpoint builds and torch.load calls; a cold conversion cache of its own."""
    monkeypatch.setenv("GPT2LOAD_CACHE_DIR", str(tmp_path / "cache"))
    counts: Counter = Counter()

    def counting(key, fn):
        def wrapped(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(stfile, "read_header", counting("header", stfile.read_header))
    monkeypatch.setattr(tfcheckpoint.TFCheckpoint, "__init__", counting("tf", tfcheckpoint.TFCheckpoint.__init__))
    monkeypatch.setattr(torch, "load", counting("torch.load", torch.load))
    return counts


def _hf(tmp_path, bin_file=False):
    hf, _ = pair()
    out = tmp_path / "hf"
    if bin_file:
        hf.config.save_pretrained(out)
        torch.save(hf.state_dict(), out / "pytorch_model.bin")
    else:
        hf.save_pretrained(out)
    return out


def _own(tmp_path, name="own", quantize=None):
    _, model = pair()
    if quantize:
        export(model, "safetensors", tmp_path / "float")
        model = load_gpt2(tmp_path / "float", device="cpu", quantize=quantize)
    export(model, "safetensors" if name != "m.pth" else "pth", tmp_path / name)
    return tmp_path / name


LAYOUTS = {  # name: (make the model in tmp_path, load_gpt2 keywords)
    "openai": (lambda t: copy_fixture("openai-tiny", t), {}),
    "hf-safetensors": (_hf, {}),
    "hf-bin": (lambda t: _hf(t, bin_file=True), {}),
    "own-folder": (_own, {}),
    "own-file": (lambda t: _own(t, "m.safetensors"), {}),
    "own-int8": (lambda t: _own(t, "q", quantize="int8"), {}),
    "book-pth": (lambda t: _own(t, "m.pth"), {"n_heads": TINY.n_heads}),
}
# (header parses, TFCheckpoint builds, torch.load calls) of one load_gpt2: without the cache, converting into
# it (the cache file is then opened once more, as gpt2load's own form), and from it
EXPECTED = {
    "openai": {"off": (0, 1, 0), "convert": (1, 1, 0), "cached": (1, 1, 0)},
    "hf-safetensors": {"off": (1, 0, 0), "convert": (2, 0, 0), "cached": (1, 0, 0)},
    "hf-bin": {"off": (0, 0, 1), "convert": (1, 0, 1), "cached": (1, 0, 0)},
    "own-folder": {"off": (1, 0, 0)},
    "own-file": {"off": (1, 0, 0)},
    "own-int8": {"off": (1, 0, 0)},
    "book-pth": {"off": (0, 0, 1)},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_load_opens_each_file_once(layout, tmp_path, opens):
    make, kwargs = LAYOUTS[layout]
    path = make(tmp_path)
    for state, want in EXPECTED[layout].items():
        opens.clear()
        model = load_gpt2(path, device="cpu", quiet=True, cache=state != "off", **kwargs)
        got = (opens["header"], opens["tf"], opens["torch.load"])
        assert got == want, (layout, state, "(header parses, TFCheckpoint builds, torch.loads)")
        assert model.cfg.vocab_size == TINY.vocab_size
