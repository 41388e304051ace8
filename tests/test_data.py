"""Token cache and sliding windows (gpt2load.training.data)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_DIR

from gpt2load.errors import Gpt2LoadError
from gpt2load.fsutil import atomic_dir, atomic_path
from gpt2load.tokenizer import EOT_ID, encode, tokenizer_from_folder
from gpt2load.training.data import TokenWindows, WindowLoader, encode_file, split_tokens, tokenize_files


@pytest.fixture(scope="module")
def enc():
    return tokenizer_from_folder(TOKENIZER_DIR)


def test_chunked_encoding_equals_whole_file_encoding(enc, tmp_path):
    rng = random.Random(0)
    pieces = ["hello", " world", "\n", "\n\n", "  ", "\t", "'s", "!", "<|endoftext|>", "é", "日本", "12", " \n", "\r\n"]
    for trial in range(60):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 200)))
        f = tmp_path / f"t{trial}.txt"
        f.write_text(text, encoding="utf-8", newline="")
        for chunk in (1, 5, 40):
            got = np.concatenate([np.zeros(0, np.uint16), *encode_file(enc, f, chunk)]).tolist()
            assert got == encode(enc, text), (chunk, text)


def test_files_are_joined_with_endoftext_and_folders_read_sorted(enc, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second doc", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("first doc", encoding="utf-8")
    (tmp_path / "docs" / "skip.md").write_text("not text data", encoding="utf-8")
    tokens, reused = tokenize_files([tmp_path / "docs"], enc, tmp_path / "cache")
    assert not reused and tokens.dtype == np.uint16
    assert tokens.tolist() == encode(enc, "first doc") + [EOT_ID] + encode(enc, "second doc")


def test_cache_is_reused_and_invalidated_when_an_input_changes(enc, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("The cat sat on the mat.\n" * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    first, reused = tokenize_files([f], enc, cache)
    assert not reused
    bins = list(cache.glob("*.bin"))
    assert len(bins) == 1
    again, reused = tokenize_files([f], enc, cache)
    assert reused and np.array_equal(first, again)

    f.write_text("The dog sat on the mat.\n" * 20, encoding="utf-8")  # same size, new content and mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, reused = tokenize_files([f], enc, cache)
    assert not reused and changed.tolist() == encode(enc, "The dog sat on the mat.\n" * 20)
    assert list(cache.glob("*.bin")) == bins  # rewritten in place, not accumulated

    bins[0].write_bytes(b"\x00")  # a damaged cache is re-made
    _, reused = tokenize_files([f], enc, cache)
    assert not reused


def test_data_errors_are_clear(enc, tmp_path):
    with pytest.raises(Gpt2LoadError, match="does not exist"):
        tokenize_files([tmp_path / "nope.txt"], enc, tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gpt2LoadError, match="no .txt files"):
        tokenize_files([tmp_path / "empty"], enc, tmp_path / "c")
    (tmp_path / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(Gpt2LoadError, match="empty"):
        tokenize_files([tmp_path / "blank.txt"], enc, tmp_path / "c")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(Gpt2LoadError, match="not UTF-8"):
        tokenize_files([tmp_path / "latin1.txt"], enc, tmp_path / "c")
    with pytest.raises(Gpt2LoadError, match="has 10 tokens, fewer than one window of 17"):
        TokenWindows(np.arange(10, dtype=np.uint16), 16, 16)
    with pytest.raises(Gpt2LoadError, match="val-ratio"):
        split_tokens(np.arange(10), 1.5)


def test_windows_match_the_books_sliding_windows():
    tokens = np.arange(100, dtype=np.uint16)
    for length, stride in ((8, 8), (8, 3), (10, 1), (99, 5)):
        w = TokenWindows(tokens, length, stride)
        book = [(tokens[i : i + length], tokens[i + 1 : i + length + 1]) for i in range(0, 100 - length, stride)]
        assert len(w) == len(book)
        for i, (x, y) in enumerate(book):
            wx, wy = w[i]
            assert wx.tolist() == x.tolist() and wy.tolist() == y.tolist()
            assert wx.dtype == torch.int64


def test_ranks_split_the_global_batch_of_one_process():
    w = TokenWindows(np.arange(400, dtype=np.uint16), 8, 4)
    single = WindowLoader(w, 4, seed=5)
    ranks = [WindowLoader(w, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(w) // 4
    for epoch in (0, 1):
        for one, *parts in zip(single.iter_epoch(epoch), *(r.iter_epoch(epoch) for r in ranks), strict=True):
            assert torch.equal(one[0], torch.cat([p[0] for p in parts]))
    assert not torch.equal(single.order(0), single.order(1))  # a new order every epoch
    resumed = list(single.iter_epoch(1, start=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, list(single.iter_epoch(1))[3:], strict=True))
    one_eval = torch.cat([x for x, _ in single.fixed_batches(3)])
    rank_eval = [torch.cat([x for x, _ in r.fixed_batches(3)]) for r in ranks]
    assert sorted(one_eval[:, 0].tolist()) == sorted(torch.cat(rank_eval)[:, 0].tolist())


def test_a_device_or_fifo_as_data_is_named_for_what_it_is(enc, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/zero", tmp_path / "pipe"):
        with pytest.raises(Gpt2LoadError, match="is not a regular file or folder"):
            tokenize_files([path], enc, tmp_path / "c")


def test_atomic_writes_leave_the_umask_alone_and_apply_it(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:

        def no_umask(mask):  # another thread could create files while the umask is flipped to 0
            raise AssertionError("the process umask must not be changed")

        monkeypatch.setattr(os, "umask", no_umask)
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"x")
        with atomic_dir(tmp_path / "folder", "hf") as tmp:
            (tmp / "f").write_text("y")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750


def test_stale_temps_of_our_naming_are_cleaned_on_the_next_write(enc, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    f = tmp_path / "a.txt"
    f.write_text("The cat sat on the mat.\n" * 5, encoding="utf-8")
    tokenize_files([f], enc, cache)
    name = next(cache.glob("*.bin")).name
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = cache / f".{name}.{dead.stdout.strip()}.abcdef12.tmp"  # a run killed mid-write
    legacy = cache / f".{name}.k3j_x9ab.tmp"  # an older version's name, an hour old
    alive = cache / f".{name}.{os.getpid()}.abcdef12.tmp"  # a live writer's: not ours to remove
    user = cache / f"{name}.tmp"  # not our naming
    for p in (killed, legacy, alive, user):
        p.write_bytes(b"partial")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    f.write_text("The dog sat on the mat.\n" * 5, encoding="utf-8")
    tokenize_files([f], enc, cache)
    assert not killed.exists() and not legacy.exists()
    assert alive.exists() and user.exists()


def test_an_unwritable_output_is_named_not_its_hidden_temp_file(tmp_path):
    target = Path("/proc/self/out.bin")  # exists as a folder, refuses new files even for root
    with pytest.raises(OSError) as e:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
    assert e.value.filename == str(target)
