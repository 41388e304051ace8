"""Continued pretraining on text files (what `gpt2load train` runs): load a model, tokenize the files into
windows, train, and save the result so that the run folder itself is a model folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import Gpt2LoadError
from ..formats.exports import save_finetuned
from ..fsutil import MARKER, RunLock, atomic_path, check_output, open_run_folder
from ..load import load_gpt2, load_tokenizer, model_folder
from ..model.gpt import GPTModel
from ..model.lora import DEFAULT_ALPHA, DEFAULT_TARGETS, check_lora_settings, parse_targets, setup_lora
from .data import TokenWindows, WindowLoader, split_tokens, tokenize_files
from .distributed import dist_info, init_distributed, rank0_first, shutdown
from .loop import check_positive, train
from .sharding import check_strategy, gather_full, is_sharded, meta_skeleton


def _set_dropout(net: GPTModel, rate: float) -> None:
    net.cfg = replace(net.cfg, drop_rate=rate)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate


def save_final(
    net: GPTModel, out: Path, tokenizer_dir: Path, metadata: dict[str, str] | None = None, merge: bool = True
) -> Path:
    """The trained model in `out/final` (gpt2load's own form; LoRA adapters merged unless `merge` is False, see
    exports.save_finetuned), and the same files at the top of `out` as hard links (no second copy on disk), so
    `--model OUT` and `--model OUT/final` both load it."""
    final = save_finetuned(net, out / "final", tokenizer_dir, metadata or {}, merge)
    for f in sorted(final.iterdir()):
        if f.name == MARKER:
            continue
        with atomic_path(out / f.name) as tmp:
            tmp.unlink()
            try:
                os.link(f, tmp)
            except OSError:  # a file system without hard links
                shutil.copyfile(f, tmp)
    return final


def sharding_skeleton(net: GPTModel, options: dict) -> nn.Module | None:
    """The meta-device copy `save_trained` needs when `train` is about to shard `net` (FSDP), else None."""
    return meta_skeleton(net) if options.get("strategy") == "fsdp" and dist_info()[1] > 1 else None


def save_trained(
    net: GPTModel,
    skeleton: nn.Module | None,
    out: Path,
    tokenizer_dir: Path,
    metadata: dict[str, str] | None = None,
    merge: bool = True,
) -> None:
    """Every process: `save_final` by rank 0, of the whole model; a sharded model is gathered onto rank 0's CPU
    first (one tensor at a time, into `skeleton`, see sharding.gather_full). An error on rank 0 is raised on
    every rank."""
    rank, _ = dist_info()
    if skeleton is not None and is_sharded(net):
        net = gather_full(net, skeleton)
    rank0_first(lambda: save_final(net, out, tokenizer_dir, metadata, merge) if rank == 0 else None)


def open_run(out: Path) -> RunLock:
    """Lock the run folder before the token cache goes in (train() takes the lock again: it is re-entrant)."""
    lock = open_run_folder(out)
    if (out / "final").exists():  # replaced at the end: refuse now rather than after the training
        try:
            check_output(out / "final", "safetensors", folder=True, force=True)
        except Gpt2LoadError:
            lock.release()
            raise
    return lock


def _loaders(
    net: GPTModel,
    enc,
    rank: int,
    world: int,
    *,
    data: Sequence[str | Path],
    val_data: Sequence[str | Path] | None,
    val_ratio: float,
    length: int,
    stride: int | None,
    batch_size: int,
    seed: int,
    cache: Path,
    quiet: bool,
) -> tuple[WindowLoader, WindowLoader | None, dict]:
    """(train loader, validation loader or None, run info) from the text files."""
    tokens = rank0_first(lambda: tokenize_files(data, enc, cache, quiet=quiet)[0])
    if val_data:
        val_tokens = rank0_first(lambda: tokenize_files(val_data, enc, cache, quiet=quiet)[0])
        train_tokens = tokens
    else:
        train_tokens, val_tokens = split_tokens(tokens, val_ratio)
    for what, t in (("the training data", train_tokens), ("the validation data", val_tokens)):
        if t is not None and len(t) and int(t.max()) >= net.cfg.vocab_size:
            raise Gpt2LoadError(
                f"{what} has token id {int(t.max())}, beyond the model's vocabulary of {net.cfg.vocab_size}"
            )
    held_out = "" if val_data or val_tokens is None else f" (less the --val-ratio {val_ratio} held out)"
    train_w = TokenWindows(train_tokens, length, stride or length, f"the training data{held_out}")
    train_loader = WindowLoader(train_w, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world)
    if len(train_loader) == 0:
        raise Gpt2LoadError(
            f"the training data makes {len(train_w)} windows, fewer than one batch of {train_loader.global_batch}"
            f" (--batch-size {batch_size} x {world} processes): lower --batch-size or --stride, or add text"
        )
    val_loader = None
    if val_tokens is not None:
        if not val_data and len(val_tokens) < length + 1:
            raise Gpt2LoadError(
                f"the validation split (--val-ratio {val_ratio}) has {len(val_tokens):,} tokens, fewer than "
                f"one window of {length + 1}: raise --val-ratio, pass --val-data, or use --val-ratio 0"
            )
        val_w = TokenWindows(val_tokens, length, length, "the validation data")
        val_loader = WindowLoader(val_w, batch_size, shuffle=False, rank=rank, world_size=world)
    info = {"batch_size": batch_size, "context_length": length, "stride": stride or length}
    info["train_tokens"], info["val_tokens"] = len(train_tokens), len(val_tokens) if val_tokens is not None else 0
    return train_loader, val_loader, info


def train_on_files(
    model: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    *,
    val_data: Sequence[str | Path] | None = None,
    val_ratio: float = 0.1,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dropout: float = 0.0,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = False,
    lora_rank: int | None = None,
    lora_alpha: float = DEFAULT_ALPHA,
    lora_targets: str | Sequence[str] = DEFAULT_TARGETS,
    merge: bool = True,
    n_heads: int | None = None,
    **options,
) -> Path:
    """Continue pretraining `model` on text files and save the result in the run folder `out` itself (and in
    `out/final`), in gpt2load's own form: `load_gpt2(out)`, `gpt2load generate --model OUT`, `convert`. Run
    it under `torchrun --nproc_per_node N` for data parallel training: `batch_size` is per process.

    Args:
        model: a size or alias, or a local model folder/file (as for load_gpt2).
        data: text files or folders of .txt files (UTF-8), tokenized once into a cache.
        out: the run folder (new, empty, or an earlier run): metrics.jsonl, loss.png, checkpoints/, tokens/
            (the cache), the model files, final/. One run at a time: it is locked while training.
        val_data: separate validation files; else the last `val_ratio` of the tokens (0: no validation).
        context_length: window length (default the model's); stride: window step (default context_length).
        batch_size: windows per batch per process.
        dropout: the model's drop rate during training.
        source, weights_dir: where sizes are downloaded from / to.
        device: cpu, cuda, mps (default: the best available).
        cache_dir: where token caches go (default out/tokens).
        quiet: no download/tokenizing messages.
        lora_rank, lora_alpha, lora_targets: train LoRA adapters only (see lora.add_lora).
        merge: save the adapters merged into the model (False: beside it, see exports.save_finetuned).
        n_heads: as for load_gpt2 (a book-layout .pth of a width no GPT-2 size has).
        **options: passed to `train` (max_steps, epochs, grad_accum, lr, ..., resume, sample_prompt, strategy,
            cpu_offload, activation_checkpointing, memory_check).
    """
    check_positive(batch_size=batch_size, context_length=context_length, stride=stride)
    if not 0.0 <= dropout < 1.0:
        raise Gpt2LoadError(f"--dropout must be at least 0 and below 1, got {dropout}")
    if not data:
        raise Gpt2LoadError("no training data given: pass one or more text files or folders with --data")
    if val_data is None:
        split_tokens(np.zeros(0, np.uint16), val_ratio)  # checks the ratio before anything slow
    if lora_rank is not None:
        check_lora_settings(lora_rank, lora_alpha)
        parse_targets(lora_targets)
    rank, world, dev = init_distributed(device)
    check_strategy(options.get("strategy", "ddp"), options.get("cpu_offload", False), world)
    lock: RunLock | None = None
    try:
        out = Path(out)
        lock = rank0_first(lambda: open_run(out) if rank == 0 else None)
        net = load_gpt2(model, source, weights_dir, device=dev, quiet=quiet or rank > 0, n_heads=n_heads)
        _set_dropout(net, dropout)
        enc = load_tokenizer(model, source, weights_dir)
        length = context_length or net.cfg.context_length
        if length > net.cfg.context_length:
            raise Gpt2LoadError(
                f"--context-length {length} exceeds the model's context length {net.cfg.context_length}: lower it"
            )
        cache = Path(cache_dir) if cache_dir else out / "tokens"
        train_loader, val_loader, info = _loaders(
            net,
            enc,
            rank,
            world,
            data=data,
            val_data=val_data,
            val_ratio=val_ratio,
            length=length,
            stride=stride,
            batch_size=batch_size,
            seed=options.get("seed", 123),
            cache=cache,
            quiet=quiet,
        )
        info["dropout"] = dropout
        lora = setup_lora(net, lora_rank, lora_alpha, lora_targets, options.get("seed", 123))
        if lora is not None:
            info["lora"] = lora
            options["train_layers"] = None  # the adapters alone train
        skeleton = sharding_skeleton(net, options)
        train(net, train_loader, val_loader, out_dir=out, tokenizer=enc, run_info=info, **options)
        where = model_folder(model, source, weights_dir, quiet=True)
        save_trained(net, skeleton, out, where if where.is_dir() else where.parent, merge=merge)
        if rank == 0:
            print(f"gpt2load: saved the trained model in {out} (and {out / 'final'})", flush=True)
        return out
    finally:
        if lock is not None:
            lock.release()
        if world > 1:
            shutdown()


__all__ = ["open_run", "save_final", "save_trained", "sharding_skeleton", "train_on_files"]
