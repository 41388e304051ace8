"""Where GPT-2's files come from, as data: every URL, repo id, file list, and pinned size or hash, in one place.

Pins are only what can be confirmed from the public releases: the sha256 of OpenAI's tokenizer files (identical
for all four sizes) and the data file's size (4 bytes per float32 parameter of the preset).
"""

from __future__ import annotations

import re

from ..model.config import PRESETS, GPTConfig

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
OPENAI_URL_VAR = "GPT2LOAD_OPENAI_URL"
OPENAI_DATA = "model.ckpt.data-00000-of-00001"
OPENAI_INDEX = "model.ckpt.index"
# Order matters: hparams.json (the architecture) and the index (its CRCs) are complete before the data file.
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    OPENAI_INDEX,
    "model.ckpt.meta",
    "vocab.bpe",
    OPENAI_DATA,
)
OPENAI_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# The architecture hparams.json must describe for each size (OpenAI's files say exactly the presets).
OPENAI_HPARAMS: dict[str, GPTConfig] = dict(PRESETS)
# The data file is the float32 parameters back to back: 4 bytes x parameter count.
OPENAI_DATA_SIZES = {"124M": 497_759_232, "355M": 1_419_292_672, "774M": 3_096_120_320, "1558M": 6_230_444_800}

HF_ENDPOINT = "https://huggingface.co"
HF_ENDPOINT_VAR = "HF_ENDPOINT"
HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
HF_WEIGHTS = "model.safetensors"
HF_FILES = ("config.json", "vocab.json", "merges.txt", HF_WEIGHTS)
# A repo id without model.safetensors (older repos, many fine-tunes) has its weights here instead.
HF_BIN = "pytorch_model.bin"
# Any other Hugging Face repo id: owner/name as the hub allows them (no "--" or "..", which also keeps the
# folder name owner--name unambiguous); a repo whose config.json says model_type gpt2 downloads like a size.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def is_repo_id(name: str) -> bool:
    """True when `name` is written as a Hugging Face repo id (owner/name)."""
    return bool(_REPO_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith((".", "-"))


SOURCES = {"hf": HF_FILES, "openai": OPENAI_FILES}
OTHER_SOURCE = {"hf": "openai", "openai": "hf"}

# Upper bounds on bytes for files whose size is not known in advance (generous: the real files are far
# smaller): a server that keeps sending is cut off here instead of filling the disk.
KB, MB = 1 << 10, 1 << 20
MAX_BYTES = {
    "checkpoint": 64 * KB,
    "hparams.json": 64 * KB,
    "config.json": 64 * KB,
    "encoder.json": 4 * MB,
    "vocab.json": 4 * MB,
    "vocab.bpe": 4 * MB,
    "merges.txt": 4 * MB,
    OPENAI_INDEX: 4 * MB,
    "model.ckpt.meta": 64 * MB,
}
MAX_WEIGHTS_BYTES = 8 << 30  # weights files without a known size (hub files always have one): 8 GiB
