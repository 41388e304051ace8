"""safetensors files written tensor by tensor, atomically, so a conversion never holds two copies in memory.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
"__metadata__": {str: str}}, then the raw little-endian tensor bytes. The offsets are fixed before any data is
written, so tensors may arrive in any order.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import Gpt2LoadError
from ..fsutil import atomic_path

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
}


ST_NAMES = _ST_DTYPES  # torch dtype -> the name safetensors headers use


def write_streaming(
    path: str | Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
    progress=None,
) -> None:
    """Write a safetensors file from a stream of tensors whose names, shapes and dtypes are known up front.

    Args:
        path: the final file; written to a temp file beside it and renamed when complete.
        specs: name -> (shape, dtype) of every tensor the stream will yield, in file order.
        tensors: (name, tensor) pairs, in any order; each is cast to its spec dtype as it is written.
        metadata: string pairs stored in the header.
        progress: optional callable taking the number of bytes just written.
    """
    header: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        n = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)  # the data starts 64-byte aligned (vector loads from the memory map)
    base = 8 + len(raw)
    written: set[str] = set()
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(base + offset)
            for name, t in tensors:
                if name not in specs:
                    raise Gpt2LoadError(f"tensor {name} was not declared for {path}")
                shape, dtype = specs[name]
                if tuple(t.shape) != tuple(shape):
                    raise Gpt2LoadError(f"tensor {name} has shape {list(t.shape)}, {path} expects {list(shape)}")
                data = t.detach().to("cpu", dtype).contiguous()
                f.seek(base + header[name]["data_offsets"][0])  # type: ignore[index]
                if data.numel():
                    f.write(memoryview(data.view(torch.uint8).numpy()))  # no intermediate bytes copy
                written.add(name)
                if progress is not None:
                    progress(data.numel() * dtype.itemsize)
            missing = [n for n in specs if n not in written]
            if missing:
                raise Gpt2LoadError(f"{path} would lack tensors {missing[:3]}: conversion incomplete")
            f.flush()
            os.fsync(f.fileno())


# Every dtype the safetensors format defines, with its size in bytes, to check offsets against shapes.
ST_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_DIMS = 8


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(name: str, e: object, data_size: int) -> str | None:
    """What is wrong with one header entry (None if nothing): every field is checked before any is used."""
    if not isinstance(e, dict):
        return f"is a JSON {type(e).__name__}, not an object"
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if dtype not in ST_ITEMSIZE:
        return f"has unknown dtype {dtype!r}"
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(n) for n in shape):
        return f"has shape {shape!r}, not a list of up to {MAX_DIMS} non-negative whole numbers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)):
        return f"has data_offsets {offsets!r}, not two non-negative whole numbers"
    start, end = offsets
    if not start <= end <= data_size:
        return f"has data_offsets {offsets} outside the file's {data_size:,} data bytes (truncated?)"
    numel = math.prod(shape)
    if (end - start) != numel * ST_ITEMSIZE[dtype]:
        return f"has {end - start:,} bytes for {dtype} shape {shape}"
    return None


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, reading only its header.

    Every field is validated (types, dtypes, shapes, offsets against the file's length) before it is returned,
    so callers may index entries and allocate by their shapes without further checks.
    """
    path = Path(path)
    redo = "delete it and convert or download again"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n:,} is implausible")
            raw = f.read(n)
            if len(raw) < n:
                raise ValueError(f"header needs {n:,} bytes, the file ends before")
            if not raw.startswith(b"{"):
                raise ValueError("header is not a JSON object")
            header = json.loads(raw)  # a deeply nested value raises RecursionError, caught below
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise Gpt2LoadError(f"{path} is missing") from None
    except IsADirectoryError:
        raise Gpt2LoadError(f"{path} is a folder, not a safetensors file") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise Gpt2LoadError(f"{path} is not a safetensors file ({e}): {redo}") from None
    if not isinstance(header, dict):
        raise Gpt2LoadError(f"{path}: the safetensors header is not a JSON object: {redo}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Gpt2LoadError(f"{path}: the safetensors __metadata__ is not a string-to-string map: {redo}")
    data_size = size - 8 - n
    for name, e in header.items():
        problem = _check_entry(name, e, data_size)
        if problem:
            raise Gpt2LoadError(f"tensor {name!r} in {path} {problem}: the file is corrupt; {redo}")
    return header, meta


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def mmap_tensors(path: str | Path, header: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, zero-copy, in a private (copy-on-write) memory map.

    Nothing is read until a tensor is used, pages are shared with the OS file cache, and writing to a tensor
    (training) copies just the touched pages: loading costs no second copy of the weights. Each tensor has its
    own storage over its own bytes of the map, so saving some of them (`torch.save(part.state_dict())`)
    writes only their bytes, while neighbours in the file stay neighbours in memory. `header`: the entries
    `read_header` already gave for this file, so it is not parsed twice.
    """
    path = Path(path)
    if header is None:
        header, _ = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    if any(base + e["data_offsets"][1] > len(mm) for e in header.values()):  # replaced since its header was read
        raise Gpt2LoadError(f"{path} changed while it was being read: load it again")
    out = {}
    for name, e in header.items():
        dtype = _TORCH_DTYPES.get(e["dtype"])
        if dtype is None:
            raise Gpt2LoadError(f"tensor {name} in {path} has dtype {e['dtype']}, which gpt2load does not load")
        start, end = e["data_offsets"]  # checked against the shape and the file length by read_header
        count = (end - start) // dtype.itemsize
        if not count:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
        out[name] = t.view(e["shape"])
    return out
