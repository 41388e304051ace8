"""Training data: text files tokenized once into a memory-mapped uint16 cache, sliding windows over it, and
the batches of any loader as one resumable stream across epochs.

The windows are the book's GPTDatasetV1 (input tokens[i:i+L], target tokens[i+1:i+L+1], i = 0, stride, ...),
computed by index arithmetic on the memmap instead of being materialised as tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import Gpt2LoadError
from ..fsutil import atomic_path
from ..tokenizer import EOT, EOT_ID, encode
from .checkpoint import rng_state, set_rng_state
from .evaluation import IGNORE_INDEX

CACHE_VERSION = 1
CHUNK_CHARS = 1 << 22  # tokenize about 4M characters at a time, so big files need little memory


def find_text_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files named, with folders replaced by the `.txt` files under them (sorted)."""
    if not paths:
        raise Gpt2LoadError("no training data given: pass one or more text files or folders with --data")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise Gpt2LoadError(f"folder {p} holds no .txt files: point --data at text files")
            files += found
        elif p.is_file():
            files.append(p)
        elif p.exists():  # a device (/dev/zero), FIFO or socket: endless or one-shot, never a corpus
            raise Gpt2LoadError(f"data path {p} is not a regular file or folder: point --data at text files")
        else:
            raise Gpt2LoadError(f"data path {p} does not exist: check the path given to --data")
    return files


def _split_point(text: str) -> int:
    """The last index just after a lone newline (non-space characters on both sides), or 0.

    GPT-2's pre-tokenizer makes such a newline a piece of its own, whether or not the text ends after it, so
    encoding the two sides separately gives exactly the tokens of encoding them together.
    """
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i <= 0:
            return 0
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1


def encode_file(enc, path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[np.ndarray]:
    """The tokens of one UTF-8 file as uint16 arrays, read and encoded a chunk at a time."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            carry = ""
            while True:
                piece = f.read(chunk_chars)
                text = carry + piece
                if not piece:
                    if text:
                        yield np.asarray(encode(enc, text), dtype=np.uint16)
                    return
                cut = _split_point(text)
                if cut == 0:  # no safe split yet: keep reading
                    carry = text
                    continue
                yield np.asarray(encode(enc, text[:cut]), dtype=np.uint16)
                carry = text[cut:]
    except UnicodeDecodeError as e:
        raise Gpt2LoadError(f"{path} is not UTF-8 text (byte {e.start}): convert it to UTF-8 or leave it out") from None
    except OSError as e:
        raise Gpt2LoadError(f"{path} could not be read ({e.strerror})") from None


def _fingerprint(files: list[Path], enc) -> dict:
    return {
        "version": CACHE_VERSION,
        "tokenizer": [enc.name, enc.n_vocab, enc.eot_token],
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
    }


def tokenize_files(
    paths: Sequence[str | Path], enc, cache_dir: str | Path, quiet: bool = True
) -> tuple[np.memmap, bool]:
    """Tokens of the text files (documents joined with <|endoftext|>) as a read-only uint16 memmap.

    The tokens are cached in `cache_dir`, named after the input paths and re-made when any file's size or
    modification time changes (or the tokenizer does). Returns (tokens, reused_cache).

    Args:
        paths: text files, or folders whose `.txt` files are used (sorted by path).
        enc: the GPT-2 tiktoken encoding.
        cache_dir: where the cache files live.
        quiet: no progress line.
    """
    if enc.n_vocab > 65536:
        raise Gpt2LoadError(f"the tokenizer has {enc.n_vocab} tokens, too many for the uint16 token cache")
    files = find_text_files(paths)
    stamp = _fingerprint(files, enc)
    name = hashlib.sha256(json.dumps([f[0] for f in stamp["files"]]).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    bin_path, meta_path = cache_dir / f"tokens-{name}.bin", cache_dir / f"tokens-{name}.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["stamp"] == stamp and bin_path.stat().st_size == 2 * meta["n_tokens"]:
            return _open(bin_path, meta["n_tokens"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a damaged one: tokenize again
    if not quiet:
        print(f"gpt2load: tokenizing {len(files)} file(s) into {bin_path}", flush=True)
    n = 0
    with atomic_path(bin_path) as tmp:
        with open(tmp, "wb") as out:
            for k, f in enumerate(files):
                if k:
                    out.write(np.array([EOT_ID], dtype=np.uint16).tobytes())
                    n += 1
                for chunk in encode_file(enc, f):
                    out.write(chunk.astype("<u2", copy=False).tobytes())
                    n += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    if n == 0 or n == len(files) - 1:
        raise Gpt2LoadError(f"no text in {', '.join(map(str, files))}: the training data is empty")
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({"stamp": stamp, "n_tokens": n, "separator": EOT}) + "\n", encoding="utf-8")
    return _open(bin_path, n), False


def _open(path: Path, n: int) -> np.memmap:
    return np.memmap(path, dtype="<u2", mode="r", shape=(n,))


def split_tokens(tokens: np.ndarray, val_ratio: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(train, validation): the last `val_ratio` of the tokens are held out (views, no copy)."""
    if not 0.0 <= val_ratio < 1.0:
        raise Gpt2LoadError(f"--val-ratio must be at least 0 and below 1, got {val_ratio}")
    if val_ratio == 0.0:
        return tokens, None
    cut = len(tokens) - int(round(len(tokens) * val_ratio))
    return tokens[:cut], tokens[cut:]


class TokenWindows:
    """The book's sliding windows over a token array: window i is tokens[i*stride : i*stride + L + 1]."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, what: str = "the data") -> None:
        if context_length < 1 or stride < 1:
            raise Gpt2LoadError(f"context length and stride must be positive (got {context_length}, {stride})")
        if len(tokens) < context_length + 1:
            raise Gpt2LoadError(
                f"{what} has {len(tokens):,} tokens, fewer than one window of {context_length + 1} "
                f"(--context-length {context_length} + 1): add text or lower --context-length"
            )
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        self._offsets = np.arange(context_length + 1)

    def __len__(self) -> int:
        return (len(self.tokens) - self.context_length - 1) // self.stride + 1

    def gather(self, index: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [len(index), L], for the windows at `index`."""
        starts = np.asarray(index, dtype=np.int64) * self.stride
        rows = torch.from_numpy(self.tokens[starts[:, None] + self._offsets].astype(np.int64))
        return rows[:, :-1], rows[:, 1:]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        x, y = self.gather([i % len(self)])
        return x[0], y[0]


class WindowLoader:
    """Batches of windows: each epoch a fresh permutation drawn from (seed, epoch), cut into global batches of
    batch_size × world_size windows, of which rank r takes the r-th slice. The last, partial batch is dropped.

    Position in the data is (epoch, batches consumed), so resuming needs no state beyond those two numbers
    and the seed. `fixed_batches(n)` gives evaluation batches that do not depend on the epoch or on any RNG.
    """

    def __init__(
        self,
        windows: TokenWindows,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 123,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return len(self.windows) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.windows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.windows), generator=g)

    def _batch(self, window_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mine = window_ids[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.windows.gather(mine.numpy())

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of `epoch`, from batch number `start` on."""
        order, g = self.order(epoch), self.global_batch
        for b in range(start, len(self)):
            yield self._batch(order[b * g : (b + 1) * g])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_epoch(self.epoch)

    def fixed_batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Up to n global batches of windows spread evenly over the data, the same on every call."""
        count = min(len(self.windows), n * self.global_batch)
        ids = torch.from_numpy(np.linspace(0, len(self.windows) - 1, count).round().astype(np.int64))
        for b in range(0, count, self.global_batch):
            chunk = ids[b : b + self.global_batch]
            per = -(-len(chunk) // self.world_size)  # a short last batch is split as evenly as it goes
            mine = chunk[self.rank * per : (self.rank + 1) * per]
            if len(mine):
                yield self.windows.gather(mine.numpy())
            elif self.world_size > 1:
                # every process runs as many forwards as the others (FSDP gathers weights inside each one):
                # a process without a share gets one window whose targets all count for nothing
                x, y = self.windows.gather(chunk[:1].numpy())
                yield x, torch.full_like(y, IGNORE_INDEX)


# ---------------------------------------------------------------- batches across epochs, for the loop


def total_steps(max_steps: int | None, epochs: int | None, loader, grad_accum: int) -> int:
    """Optimizer steps of a run: max_steps, or the epochs' batches over grad_accum."""
    if max_steps is not None:
        return max_steps
    try:
        per_epoch = len(loader)
    except TypeError:
        raise Gpt2LoadError("the training loader has no length: give max_steps instead of epochs") from None
    total = (epochs or 1) * per_epoch // grad_accum
    if total < 1:
        raise Gpt2LoadError(
            f"{epochs or 1} epoch(s) of {per_epoch} batches make no step of --grad-accum {grad_accum} batches: "
            "lower --grad-accum or --batch-size, or give --max-steps"
        )
    return total


def open_epoch(loader, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An iterator over `loader`'s batches of `epoch`, from batch number `start` on."""
    if hasattr(loader, "iter_epoch"):
        return loader.iter_epoch(epoch, start)
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    it = iter(loader)
    for _ in range(start):
        next(it)  # re-reads the batches already seen this epoch: exact when the order is reproducible
    return it


class BatchStream:
    """The training batches as one stream across epochs, at a position (epoch, batches read) that checkpoints
    save. For loaders without `iter_epoch`, the torch RNG state just before each epoch's `iter()` is kept too,
    so that a shuffling DataLoader draws the same order again when a run resumes mid-epoch."""

    def __init__(self, loader, epoch: int = 0, position: int = 0, epoch_rng: torch.Tensor | None = None) -> None:
        self.loader, self.epoch, self.position, self.epoch_rng = loader, epoch, position, epoch_rng
        self._resuming = position > 0 or epoch_rng is not None
        self._it: Iterator | None = None

    def _open(self) -> None:
        if self._resuming:
            now = rng_state(None)
            if self.epoch_rng is not None:
                torch.set_rng_state(self.epoch_rng.cpu())
            self._it = open_epoch(self.loader, self.epoch, self.position)
            set_rng_state(now)
            self._resuming = False
        else:
            self.epoch_rng = torch.get_rng_state()
            self._it = open_epoch(self.loader, self.epoch, self.position)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.position == 0:
                    raise Gpt2LoadError("the training loader yielded no batches") from None
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch


__all__ = [
    "BatchStream",
    "TokenWindows",
    "WindowLoader",
    "find_text_files",
    "open_epoch",
    "split_tokens",
    "tokenize_files",
    "total_steps",
]
