"""An earlier gpt2load, side by side with this one: `git archive REV gpt2load` imported as `gpt2load_base`.

The bench's fp32 rows then also time that version on the same weights, in the same run, so a change's effect on
decoding speed is measured on this machine rather than read off an older table from another one.
"""

from __future__ import annotations

import atexit
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from gpt2load import generate

ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, folder: Path):
    """The package `gpt2load` of git revision `rev`, extracted under `folder` and imported as `gpt2load_base`
    (its imports are relative, so it does not see this checkout's gpt2load)."""
    tar = subprocess.run(["git", "archive", rev, "gpt2load"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for member in archive.getmembers():
            member.name = "gpt2load_base" + member.name[len("gpt2load") :]
            archive.extract(member, folder, filter="data")
    sys.path.insert(0, str(folder))
    return importlib.import_module("gpt2load_base")


def baseline_model(rev: str, model, folder: Path | None = None):
    """(gpt2load_base, its GPTModel holding `model`'s weights). Raises if that model does not decode the same
    greedy tokens as `model` (then the comparison would not be of equal work)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="gpt2load-base-"))
        atexit.register(shutil.rmtree, folder, True)
    base = import_revision(rev, folder)
    cfg = base.GPTConfig(**{k: getattr(model.cfg, k) for k in base.GPTConfig.__dataclass_fields__})
    old = base.GPTModel(cfg).eval()
    state = dict(model.state_dict())
    state.setdefault("out_head.weight", state["tok_emb.weight"])
    old.load_state_dict(state, strict=False)
    try:  # since the speed layer is a backend the model is handed, a bare GPTModel computes as the book's
        importlib.import_module("gpt2load_base.fast.backend").accelerate(old)
    except ModuleNotFoundError:  # earlier versions: their modules took their fast paths by themselves
        pass
    prompt = torch.arange(1, 9)[None]
    if not torch.equal(base.generate(old, prompt, 8), generate(model, prompt, 8)):
        raise RuntimeError(f"gpt2load at {rev} decodes other tokens from the same weights: not comparable")
    return base, old


__all__ = ["baseline_model", "import_revision"]
