"""Write a TensorFlow V2 checkpoint (tensor bundle) without TensorFlow, for benchmarks.

Benchmarks need OpenAI-layout checkpoints of the real sizes with random weights; TensorFlow is not a
dependency, so this writes the format directly: one shard, one uncompressed SSTable data block. The reader's
correctness is tested on checkpoints TensorFlow itself wrote (tests/fixtures); this file only feeds benches.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from gpt2load.formats.tfcheckpoint import masked_crc32c

_MAGIC = 0xDB4775248B80FB57
_DT_FLOAT = 1


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint(num << 3 | wire) + payload


def _ld(num: int, data: bytes) -> bytes:  # a length-delimited field
    return _field(num, 2, _varint(len(data)) + data)


def tensor_entry(shape: tuple[int, ...], offset: int, size: int, crc: int) -> bytes:
    dims = b"".join(_ld(2, _field(1, 0, _varint(d))) for d in shape)
    return (
        _field(1, 0, _varint(_DT_FLOAT))
        + _ld(2, dims)
        + _field(4, 0, _varint(offset))
        + _field(5, 0, _varint(size))
        + _field(6, 5, struct.pack("<I", crc))
    )


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    """Entries without prefix sharing, one restart point: simple, and valid LevelDB table format."""
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    return body + struct.pack("<II", 0, 1)


def _with_trailer(out: bytearray, contents: bytes) -> bytes:
    """Append a block and its trailer to `out`; return its encoded handle."""
    handle = _varint(len(out)) + _varint(len(contents))
    out += contents + b"\x00" + struct.pack("<I", masked_crc32c(contents + b"\x00"))
    return handle


def write_checkpoint(folder: Path, tensors, hparams: dict) -> None:
    """Write `tensors` ({name: float32 tensor}, streamed in sorted order) as folder/model.ckpt.*"""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    offset = 0
    with open(folder / "model.ckpt.data-00000-of-00001", "wb") as data:
        for name in sorted(tensors):
            raw = tensors[name].detach().to(torch.float32).contiguous().numpy().tobytes()
            data.write(raw)
            entries.append(
                (name.encode(), tensor_entry(tuple(tensors[name].shape), offset, len(raw), masked_crc32c(raw)))
            )
            offset += len(raw)
    write_index(folder, entries)
    (folder / "checkpoint").write_text(
        'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    )
    (folder / "hparams.json").write_text(json.dumps(hparams, indent=2))


def write_index(folder: Path, entries: list[tuple[bytes, bytes]]) -> None:
    """folder/model.ckpt.index holding (name, BundleEntryProto bytes) pairs, in the order given."""
    header = _field(1, 0, _varint(1)) + _ld(3, _field(1, 0, _varint(1)))  # num_shards 1, version{producer 1}
    out = bytearray()
    data_handle = _with_trailer(out, _block([(b"", header), *entries]))
    meta_handle = _with_trailer(out, _block([]))
    index_handle = _with_trailer(out, _block([(entries[-1][0], data_handle)]))
    footer = meta_handle + index_handle
    out += footer + b"\x00" * (40 - len(footer)) + struct.pack("<Q", _MAGIC)
    (folder / "model.ckpt.index").write_bytes(bytes(out))
