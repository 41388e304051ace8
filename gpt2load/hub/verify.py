"""What makes a downloaded file good: the content checks run before a file is recorded as verified.

Hub files are checked against the hub's own id of their content (sha256 for LFS files, git blob sha1 for the
rest) by the caller; the checks here look inside files: OpenAI's `checkpoint` and `hparams.json` must parse and
describe the size asked for, `model.ckpt.index` must parse as a tensor bundle whose tensors are exactly those
of that architecture, `model.ckpt.meta` must parse as a MetaGraphDef (protobuf wire format), the data file
must match every tensor's CRC32C; a Hugging Face `config.json` must parse as a GPT-2 config,
`model.safetensors` must have a well-formed header and `pytorch_model.bin` (a repo without safetensors) must
load with `torch.load(weights_only=True)` as a state_dict of tensors. Each raises Gpt2LoadError saying what is wrong.

Every check takes (file, its download folder, the size asked for): `OPENAI_CHECKS` and `HF_CHECKS` map file
names to them. Checks that read an earlier file (the index reads hparams.json) rely on the download order.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..formats.names import CONV1D, CONV1D_3D, OPENAI, expected_shapes
from ..formats.tfcheckpoint import _fields, read_index, verify_checkpoint
from ..model.config import GPTConfig, read_hf_config, read_hparams
from .manifest import link_or_copy
from .sources import HF_BIN, MAX_WEIGHTS_BYTES, OPENAI_DATA, OPENAI_HPARAMS, OPENAI_INDEX

_FLOAT32 = 1  # TensorFlow DataType enum
# MetaGraphDef's fields (meta_info_def, graph_def, saver_def, collection_def, signature_def, asset_file_def,
# object_graph_def) are all messages; graph_def's node entries (field 1) are NodeDefs with a name (field 1).
_META_FIELDS = range(1, 8)


def checkpoint_names_model_ckpt(path: Path, folder: Path, size: str) -> None:
    """OpenAI's `checkpoint`: text lines `key: "value"` naming model.ckpt."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise Gpt2LoadError("not UTF-8 text") from None
    values = {}
    for line in filter(None, (ln.strip() for ln in lines)):
        key, sep, value = line.partition(":")
        value = value.strip()
        if not sep or len(value) < 2 or value[0] != '"' or value[-1] != '"':
            raise Gpt2LoadError(f'line {line[:40]!r} is not `key: "value"`')
        values.setdefault(key.strip(), value[1:-1])
    if values.get("model_checkpoint_path") != "model.ckpt":
        raise Gpt2LoadError('it does not say model_checkpoint_path: "model.ckpt"')


def expected_hparams(size: str) -> GPTConfig:
    return OPENAI_HPARAMS[size]


def hparams_describe_the_size(path: Path, folder: Path, size: str) -> None:
    check_hparams(path, size)


def check_hparams(path: Path, size: str) -> GPTConfig:
    """`hparams.json` parses and describes exactly the architecture of `size`."""
    cfg = read_hparams(path)
    want = expected_hparams(size)
    if cfg != want:
        diff = ", ".join(
            f"{k} {v} (expected {want.to_dict()[k]})" for k, v in cfg.to_dict().items() if v != want.to_dict()[k]
        )
        raise Gpt2LoadError(f"it describes another model than {size}: {diff}")
    return cfg


def _source_shape(layout: str, parts: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape a source tensor has when it holds these GPTModel tensors (the inverse of convert's split)."""
    shape = (sum(p[0] for p in parts), *parts[0][1:])
    if layout in (CONV1D, CONV1D_3D):
        shape = shape[::-1]
    return (1, *shape) if layout == CONV1D_3D else shape


def index_matches_hparams(path: Path, folder: Path, size: str) -> None:
    cfg = check_hparams(folder / "hparams.json", size)
    check_index(path, cfg, 4 * cfg.n_params)


def check_index(path: Path, cfg: GPTConfig, data_size: int) -> None:
    """`model.ckpt.index` parses and lists exactly the float32 tensors of `cfg`, laid out inside the data file."""
    header, entries = read_index(path)
    if header.get(1, 1) != 1:
        raise Gpt2LoadError(f"it names {header.get(1)} data shards, OpenAI's checkpoints have one")
    shapes = expected_shapes(cfg)
    want = {src: _source_shape(rule.layout, [shapes[t] for t in targets]) for src, rule, targets in OPENAI.inverse(cfg)}
    if set(entries) != set(want):
        odd = sorted(set(entries) ^ set(want))
        raise Gpt2LoadError(f"its tensors differ from hparams.json's architecture (e.g. {odd[0]!r})")
    for name, e in entries.items():
        if e.shape != want[name] or e.dtype != _FLOAT32 or e.size != 4 * _numel(e.shape) or e.shard_id != 0:
            raise Gpt2LoadError(
                f"tensor {name!r} is {list(e.shape)} dtype {e.dtype}, expected {list(want[name])} float32"
            )
        if e.offset + e.size > data_size or e.crc32c is None:
            raise Gpt2LoadError(f"tensor {name!r} lies outside the data file or has no CRC32C")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def meta_parses(path: Path, folder: Path, size: str) -> None:
    """`model.ckpt.meta` parses as a MetaGraphDef whose graph's nodes all have names (protobuf wire format)."""
    try:
        top = list(_fields(path.read_bytes()))
        nodes = 0
        for num, wire, value in top:
            if num not in _META_FIELDS or wire != 2:
                raise ValueError(f"field {num} (wire type {wire}) is not part of a MetaGraphDef")
            if num == 2:
                for n, w, node in _fields(value):
                    if n == 1 and w == 2:
                        if not any(k == 1 and kw == 2 and name for k, kw, name in _fields(node)):
                            raise ValueError("a graph node has no name")
                        nodes += 1
        if not nodes:
            raise ValueError("it holds no graph")
    except (ValueError, struct.error) as e:
        raise Gpt2LoadError(f"not a TensorFlow MetaGraphDef ({e})") from None


def data_matches_crc32c(data: Path, folder: Path, size: str) -> None:
    """Every tensor's CRC32C, via the (complete, verified) index, before the data file gets its final name."""
    index = folder / OPENAI_INDEX
    # verify_checkpoint wants `prefix.index` next to `prefix.data-...`: stage links under those names.
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=data.parent) as tmp:
        link_or_copy(index, Path(tmp) / OPENAI_INDEX)
        link_or_copy(data, Path(tmp) / OPENAI_DATA)
        try:
            verify_checkpoint(Path(tmp) / "model.ckpt")
        except Gpt2LoadError as e:  # keep its "what", drop its advice and the staging path
            raise Gpt2LoadError(str(e).replace(tmp + os.sep, "").rsplit(": ", 1)[0]) from None


class NotGPT2(Gpt2LoadError):
    """A config.json that parses but describes another kind of model: said as what it is, not as corruption."""


def config_is_gpt2(path: Path, folder: Path, size: str) -> None:
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raw = None  # read_hf_config says what is wrong with it
    kind = raw.get("model_type", "gpt2") if isinstance(raw, dict) else "gpt2"
    if kind != "gpt2":
        raise NotGPT2(f"is a {str(kind)[:64]!r} model (its config.json's model_type), not GPT-2: gpt2load loads gpt2")
    read_hf_config(path)


def vocab_is_json_object(path: Path, folder: Path, size: str) -> None:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise Gpt2LoadError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise Gpt2LoadError("not a JSON object")


def safetensors_header_parses(path: Path, folder: Path, size: str) -> None:
    """An 8-byte little-endian length, then that many bytes of JSON object, within the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(100 << 20, path.stat().st_size - 8):
            raise Gpt2LoadError("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        raise Gpt2LoadError("not a safetensors file (its header is not a JSON object)")


def bin_is_a_state_dict(path: Path, folder: Path, size: str) -> None:
    """`pytorch_model.bin`: within the weights cap, and `torch.load(weights_only=True)` gives a non-empty dict of
    named tensors (weights_only: a pickle from the network must not run code)."""
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise Gpt2LoadError(f"larger than the {MAX_WEIGHTS_BYTES >> 30} GiB cap for a weights file")
    try:  # the zip format maps; the legacy one (older .bin files) is read into memory, hence the cap
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for a bad or hostile file
        raise Gpt2LoadError(f"not a state_dict that loads with weights_only=True ({type(e).__name__})") from None
    if not isinstance(state, dict) or not state:
        raise Gpt2LoadError(f"it holds a {type(state).__name__}, not a state_dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise Gpt2LoadError(f"entry {str(key)[:64]!r} holds a {type(value).__name__}, not a tensor")


Check = Callable[[Path, Path, str], None]
OPENAI_CHECKS: dict[str, Check] = {
    "checkpoint": checkpoint_names_model_ckpt,
    "hparams.json": hparams_describe_the_size,
    OPENAI_INDEX: index_matches_hparams,
    "model.ckpt.meta": meta_parses,
    OPENAI_DATA: data_matches_crc32c,
}
HF_CHECKS: dict[str, Check] = {
    "config.json": config_is_gpt2,
    "vocab.json": vocab_is_json_object,
    "model.safetensors": safetensors_header_parses,
    HF_BIN: bin_is_a_state_dict,
}
