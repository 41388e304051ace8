"""safetensors files written tensor by tensor, atomically, so a conversion never holds two copies in memory.

The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
"__metadata__": {str: str}}, then the raw little-endian tensor bytes. The offsets are fixed before any data is
written, so tensors may arrive in any order.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import Gpt2LoadError

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: Path, suffix: str = ""):
    """A temporary path beside `final`, renamed onto it only if the block finishes without an error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the result should look like any new file
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


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
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
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


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file, reading only its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise Gpt2LoadError(f"{path} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Gpt2LoadError(
            f"{path} is not a safetensors file ({e}): delete it and convert or download again"
        ) from None
    meta = header.pop("__metadata__", None) or {}
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if 8 + n + end > size:
        raise Gpt2LoadError(
            f"{path} is truncated ({size:,} bytes, its header needs {8 + n + end:,}): delete it "
            "and convert or download again"
        )
    return header, meta


_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def mmap_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, zero-copy, in a private (copy-on-write) memory map.

    Nothing is read until a tensor is used, pages are shared with the OS file cache, and writing to a tensor
    (training) copies just the touched pages: loading costs no second copy of the weights. Each tensor has its
    own storage over its own bytes of the map, so saving some of them (`torch.save(part.state_dict())`)
    writes only their bytes, while neighbours in the file stay neighbours in memory.
    """
    path = Path(path)
    header, _ = read_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    out = {}
    for name, e in header.items():
        dtype = _TORCH_DTYPES.get(e["dtype"])
        if dtype is None:
            raise Gpt2LoadError(f"tensor {name} in {path} has dtype {e['dtype']}, which gpt2load does not load")
        start, end = e["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count != torch.Size(e["shape"]).numel():
            raise Gpt2LoadError(f"tensor {name} in {path} has {end - start} bytes for shape {e['shape']}: corrupt")
        if not count:
            t = torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + start)
        out[name] = t.view(e["shape"])
    return out
