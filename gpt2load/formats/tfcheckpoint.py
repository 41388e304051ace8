"""Read TensorFlow V2 checkpoints (tensor bundles) without TensorFlow.

A bundle is `PREFIX.index`, an SSTable (LevelDB table format) mapping tensor names to BundleEntryProto
(key "" holds the BundleHeaderProto), plus `PREFIX.data-SSSSS-of-NNNNN` shards holding raw little-endian
tensor bytes at the offsets the entries give. Every entry carries a masked CRC32C of its bytes, and every
SSTable block a masked CRC32C of its contents: both are checked.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c
import torch

from ..errors import Gpt2LoadError

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_MASK_DELTA = 0xA282EAD8

# TensorFlow DataType enum -> torch dtype, for the types a weight file can reasonably hold.
_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.int32,
    4: torch.uint8,
    5: torch.int16,
    6: torch.int8,
    9: torch.int64,
    10: torch.bool,
    14: torch.bfloat16,
    19: torch.float16,
}
_MAX_DIMS = 8
_MAX_SHARDS = 100_000  # the file names hold five digits
_DTYPE_NAMES = {7: "string", 8: "complex64", 18: "complex128", 20: "resource", 21: "variant"}


def masked_crc32c(data) -> int:
    """CRC32C as LevelDB and TensorFlow store it: rotated right by 15 bits plus a constant."""
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --- protobuf wire format: just enough to read BundleHeaderProto and BundleEntryProto ---------------------


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) for each field of a serialized message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = bytes(buf[pos : pos + n]), pos + n
            if pos > len(buf):
                raise ValueError("truncated field")
        elif wire == 5:
            val, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield num, wire, val


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: BundleEntryProto, decoded."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None
    sliced: bool

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype)


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for num, _, val in _fields(buf):
        if num == 2:
            size = next((v for n, _, v in _fields(val) if n == 1), 0)
            if not isinstance(size, int) or size >= 1 << 63:  # int64 two's complement: a negative (unknown) size
                raise ValueError("a tensor has a negative or unknown dimension")
            dims.append(size)
        elif num == 3 and val:
            raise ValueError("shape of unknown rank")
    if len(dims) > _MAX_DIMS:
        raise ValueError(f"a tensor has {len(dims)} dimensions")
    return tuple(dims)


def _parse_entry(name: str, buf: bytes) -> TensorEntry:
    f: dict[str, object] = {
        "dtype": 0,
        "shape": (),
        "shard_id": 0,
        "offset": 0,
        "size": 0,
        "crc32c": None,
        "sliced": False,
    }
    for num, _, val in _fields(buf):
        if num == 1:
            f["dtype"] = val
        elif num == 2:
            f["shape"] = _parse_shape(val)
        elif num == 3:
            f["shard_id"] = val
        elif num == 4:
            f["offset"] = val
        elif num == 5:
            f["size"] = val
        elif num == 6:
            f["crc32c"] = val
        elif num == 7:
            f["sliced"] = True
    return TensorEntry(name=name, **f)  # type: ignore[arg-type]


# --- SSTable ------------------------------------------------------------------------------------------------


def _block(data: bytes, handle: bytes, path: Path) -> bytes:
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size + 5  # contents, then a 1-byte compression type and a 4-byte masked CRC
    if end > len(data):
        raise Gpt2LoadError(
            f"{path} is truncated (a block ends at byte {end}, the file has {len(data)}): download it again"
        )
    contents, kind = data[offset : offset + size], data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if masked_crc32c(data[offset : offset + size + 1]) != stored:
        raise Gpt2LoadError(f"{path} is corrupt (block at byte {offset} fails its CRC32C): download it again")
    if kind != 0:
        raise Gpt2LoadError(
            f"{path} uses compressed blocks (type {kind}), which gpt2load does not read; "
            "re-save the checkpoint without compression"
        )
    return contents


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * n_restarts
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        yield key, block[pos : pos + vlen]
        pos += vlen


def read_index(path: str | Path) -> tuple[dict, dict[str, TensorEntry]]:
    """Parse a `.index` file into (header fields, {tensor name: TensorEntry})."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Gpt2LoadError(f"{path} is missing: download the checkpoint again") from None
    if len(data) < _FOOTER_LEN or struct.unpack_from("<Q", data, len(data) - 8)[0] != _TABLE_MAGIC:
        raise Gpt2LoadError(f"{path} is not a TensorFlow checkpoint index (bad footer): download it again")
    try:
        footer = data[-_FOOTER_LEN:]
        _, pos = _varint(footer, 0)
        _, pos = _varint(footer, pos)  # skip the (empty) metaindex handle
        index_block = _block(data, footer[pos:], path)
        header: dict = {}
        entries: dict[str, TensorEntry] = {}
        for _, handle in _block_entries(index_block):
            for key, value in _block_entries(_block(data, handle, path)):
                if key == b"":
                    header = {n: v for n, _, v in _fields(value)}
                elif key.startswith(b"\x00"):
                    continue  # the pieces of a partitioned tensor; its full entry carries `slices`
                else:
                    name = key.decode("utf-8")
                    entries[name] = _parse_entry(name, value)
    except (ValueError, TypeError, struct.error, IndexError) as e:
        raise Gpt2LoadError(f"{path} is malformed ({e}): download it again") from None
    if header.get(2, 0) != 0:
        raise Gpt2LoadError(f"{path} holds big-endian tensors, which gpt2load does not read")
    shards = header.get(1, 1)
    if not isinstance(shards, int) or not 1 <= shards <= _MAX_SHARDS:
        raise Gpt2LoadError(f"{path} is malformed (it says {shards!r} data shards): download it again")
    for e in entries.values():
        if not isinstance(e.shard_id, int) or e.shard_id >= shards:
            raise Gpt2LoadError(
                f"{path} is malformed (tensor {e.name} is in shard {e.shard_id!r} of {shards}): download it again"
            )
        if not all(isinstance(v, int) for v in (e.dtype, e.offset, e.size)):
            raise Gpt2LoadError(f"{path} is malformed (tensor {e.name} has a non-integer field): download it again")
    return header, entries


class TFCheckpoint:
    """A TensorFlow V2 checkpoint opened for reading, tensor by tensor.

    Args:
        prefix: the checkpoint prefix (`.../model.ckpt`), its `.index` file, or a folder with a `checkpoint` file.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = resolve_prefix(Path(prefix))
        header, self.entries = read_index(self.prefix.with_name(self.prefix.name + ".index"))
        self.num_shards = header.get(1, 1)
        self._maps: dict[int, mmap.mmap] = {}
        for e in self.entries.values():
            if e.sliced:
                raise Gpt2LoadError(
                    f"tensor {e.name} in {self.prefix}.index is saved in slices (a partitioned "
                    "variable), which gpt2load does not read; save it unpartitioned"
                )

    def shard_path(self, shard_id: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def check_shards(self) -> None:
        """Every data shard exists and is at least as long as the index says."""
        need: dict[int, int] = {}
        for e in self.entries.values():
            need[e.shard_id] = max(need.get(e.shard_id, 0), e.offset + e.size)
        for shard, length in sorted(need.items()):
            path = self.shard_path(shard)
            if not path.exists():
                raise Gpt2LoadError(f"{path} is missing: download the checkpoint again")
            have = path.stat().st_size
            if have < length:
                raise Gpt2LoadError(
                    f"{path} is truncated ({have:,} bytes, the index needs {length:,}): download it again"
                )

    def _map(self, shard_id: int) -> mmap.mmap:
        """The shard memory-mapped once: tensors are views of the OS file cache, not copies."""
        if shard_id not in self._maps:
            path = self.shard_path(shard_id)
            try:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size == 0:
                        raise Gpt2LoadError(f"{path} is empty: download the checkpoint again")
                    # ACCESS_COPY: private and writable, so torch.frombuffer accepts it; nothing writes to it.
                    self._maps[shard_id] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except FileNotFoundError:
                raise Gpt2LoadError(f"{path} is missing: download the checkpoint again") from None
        return self._maps[shard_id]

    def read_bytes(self, name: str, verify: bool = True) -> memoryview:
        """The raw bytes of one tensor (a view of the mapped shard), checked against the CRC32C in the index."""
        e = self.entries[name]
        mm = self._map(e.shard_id)
        if e.offset + e.size > len(mm):
            raise Gpt2LoadError(
                f"{self.shard_path(e.shard_id)} is truncated: tensor {name} needs bytes {e.offset:,}.."
                f"{e.offset + e.size:,} but the file ends at {len(mm):,}; download it again"
            )
        view = memoryview(mm)[e.offset : e.offset + e.size]
        if verify and e.crc32c is not None and masked_crc32c(view) != e.crc32c:
            raise Gpt2LoadError(
                f"tensor {name} in {self.shard_path(e.shard_id)} fails its CRC32C check (the file is corrupt): "
                "delete it and download again"
            )
        return view

    def release(self, name: str) -> None:
        """Let the OS drop the cached pages of a tensor already used, so streaming stays at one tensor of
        memory. Safe even if the tensor is still referenced: unmodified private pages are re-read on access."""
        e = self.entries[name]
        mm = self._maps.get(e.shard_id)
        start = -(-e.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (e.offset + e.size) // mmap.PAGESIZE * mmap.PAGESIZE
        if mm is not None and end > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, name: str, verify: bool = True) -> torch.Tensor:
        """One tensor, as a torch tensor of its stored dtype and shape."""
        e = self.entries.get(name)
        if e is None:
            raise Gpt2LoadError(f"tensor {name} is not in {self.prefix}.index")
        dtype = e.torch_dtype
        if dtype is None:
            kind = _DTYPE_NAMES.get(e.dtype, f"DataType {e.dtype}")
            raise Gpt2LoadError(
                f"tensor {name} in {self.prefix}.index has dtype {kind}, which gpt2load cannot turn into a torch tensor"
            )
        buf = self.read_bytes(name, verify)
        expect = torch.Size(e.shape).numel() * dtype.itemsize
        if expect != e.size:
            raise Gpt2LoadError(
                f"tensor {name} in {self.prefix}.index says shape {list(e.shape)} but holds "
                f"{e.size} bytes: the checkpoint is corrupt"
            )
        if not buf:
            return torch.empty(e.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e.shape)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in file order; each one's pages are released once the consumer asks for the next."""
        for name in self.entries:
            yield name, self.read(name)
            self.release(name)

    def verify(self) -> None:
        """Check shard lengths and every tensor's CRC32C, reading one tensor at a time."""
        self.check_shards()
        for name in self.entries:
            self.read_bytes(name, verify=True)
            self.release(name)


def resolve_prefix(p: Path) -> Path:
    """The checkpoint prefix for a prefix, an `.index` path, or a folder (via its `checkpoint` file)."""
    if p.is_dir():
        state = p / "checkpoint"
        name = "model.ckpt"
        if state.is_file():
            try:
                text = state.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise Gpt2LoadError(
                    f"{state} is not a text file (not UTF-8): delete it (gpt2load then uses model.ckpt) "
                    "or download again"
                ) from None
            for line in text.splitlines():
                if line.startswith("model_checkpoint_path:"):
                    name = line.split(":", 1)[1].strip().strip('"')
        return p / name
    if p.suffix == ".index":
        return p.with_suffix("")
    return p


def verify_checkpoint(prefix: str | Path) -> None:
    """Raise Gpt2LoadError unless every shard is complete and every tensor matches its CRC32C."""
    TFCheckpoint(prefix).verify()
