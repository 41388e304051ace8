"""The book's fine-tuning workflows as recipes: a classifier (chapter 6) and an instruction follower
(chapter 7), each optionally through LoRA adapters (appendix E).

Both run the ordinary training loop (checkpoints, exact resume, metrics.jsonl) on (input, target) batches
from finetune_data; a classifier's targets are -100 except at the pooled position, so its loss is the book's
cross-entropy over that position's logits of the new head. The result lands in the run folder (and in
OUT/final) in gpt2load's own form, with what using it needs in the file's metadata: `classifier` (labels,
pool, max_length) or `prompt_template`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import Gpt2LoadError
from ..fsutil import atomic_path
from ..load import load_gpt2, load_tokenizer, model_folder
from ..model.lora import DEFAULT_ALPHA, DEFAULT_TARGETS, check_lora_settings, parse_targets, setup_lora
from ..training.data import WindowLoader
from ..training.distributed import all_sum, dist_info, init_distributed, rank0_first, shutdown
from ..training.loop import check_positive, train
from ..training.metrics import MetricsLog, plot_curves
from ..training.pretrain import open_run, save_trained, sharding_skeleton
from ..training.sharding import check_strategy
from .data import (
    IGNORE_INDEX,
    POOLS,
    ClassificationData,
    encode_instructions,
    encode_texts,
    label_indices,
    make_label_names,
    read_instructions,
    read_table,
)

CLASSIFIER_KEY = "classifier"  # metadata: {"labels": [...], "pool": ..., "max_length": N}
TEMPLATE_KEY = "prompt_template"  # metadata: the name of the template in templates.TEMPLATES
# chapters 6 and 7: what a recipe uses for the settings left at None
BOOK_DEFAULTS = {"classify": {"epochs": 5, "train_layers": "last:1"}, "instruct": {"epochs": 2, "train_layers": "all"}}


@dataclass
class FinetuneConfig:
    """The settings both recipes share (their common CLI flags).

    Fields: train_layers ("all" or "last:N"; default the book's: last:1 for a classifier, all for
    instructions; ignored with LoRA), epochs (default the book's 5 / 2) or max_steps, batch_size, lr (constant,
    as the book trains), weight_decay, eval_every / eval_batches (steps between evaluations / batches each),
    save_every / keep_checkpoints, seed, dtype ("float32" or "bfloat16" autocast), resume, progress;
    lora_rank / lora_alpha / lora_targets (train LoRA adapters only, see lora.add_lora) and merge (fold them into
    the saved model; False saves them beside it); source / weights_dir / device / quiet / n_heads (as for
    load_gpt2); strategy / cpu_offload / activation_checkpointing / memory_check (as for training.loop.train;
    under torchrun every process reads its share of each batch, `batch_size` per process).
    """

    train_layers: str | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 5
    save_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 123
    dtype: str = "float32"
    resume: bool = False
    progress: bool | None = None
    lora_rank: int | None = None
    lora_alpha: float = DEFAULT_ALPHA
    lora_targets: str | Sequence[str] = DEFAULT_TARGETS
    merge: bool = True
    source: str = "hf"
    weights_dir: str | Path | None = None
    device: str | None = None
    quiet: bool = False
    n_heads: int | None = None
    strategy: str = "ddp"
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    memory_check: bool = True

    def check(self) -> None:
        """The settings that can be checked before any loading, as one clear error each."""
        check_positive(batch_size=self.batch_size)
        if self.lora_rank is not None:
            check_lora_settings(self.lora_rank, self.lora_alpha)
            parse_targets(self.lora_targets)


def _settings(config: FinetuneConfig | None, options: dict) -> FinetuneConfig:
    unknown = set(options) - set(asdict(FinetuneConfig()))
    if unknown:
        raise TypeError(f"unknown fine-tuning options {sorted(unknown)}")
    cfg = replace(config or FinetuneConfig(), **options)
    cfg.check()
    return cfg


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float | None:
    """Share of counted targets (not -100) where the model's top logit is the target, over every process's
    batches; None without any."""
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for x, y in batches:
        y = y.to(device)
        keep = y != IGNORE_INDEX
        correct += int((model(x.to(device)).argmax(-1)[keep] == y[keep]).sum())
        total += int(keep.sum())
    model.train(was_training)
    correct, total = all_sum([float(correct), float(total)], device)
    return correct / total if total else None


def _load(cfg: FinetuneConfig, model):
    """(model in float32, tokenizer, the folder its tokenizer files are in), after joining torchrun's processes."""
    rank, world, device = init_distributed(cfg.device)
    check_strategy(cfg.strategy, cfg.cpu_offload, world)
    net = load_gpt2(model, cfg.source, cfg.weights_dir, device=device, quiet=cfg.quiet or rank > 0, n_heads=cfg.n_heads)
    enc = load_tokenizer(model, cfg.source, cfg.weights_dir)
    where = model_folder(model, cfg.source, cfg.weights_dir, quiet=True)
    return net, enc, where if where.is_dir() else where.parent


def _check_length(max_length: int | None, net) -> None:
    check_positive(max_length=max_length)
    if max_length is not None and max_length > net.cfg.context_length:
        raise Gpt2LoadError(
            f"--max-length {max_length} exceeds the model's context length {net.cfg.context_length}: lower it"
        )


def _loader(data, cfg: FinetuneConfig, shuffle: bool, what: str) -> WindowLoader:
    rank, world = dist_info()
    loader = WindowLoader(data, cfg.batch_size, shuffle=shuffle, seed=cfg.seed, rank=rank, world_size=world)
    if shuffle and len(loader) == 0:
        batch = f"{cfg.batch_size} x {world} processes" if world > 1 else f"{cfg.batch_size}"
        raise Gpt2LoadError(
            f"{what} has {len(data)} examples, fewer than one batch of {batch}: lower --batch-size or add data"
        )
    return loader


def _all_batches(loader: WindowLoader):
    """Every example once, in order (WindowLoader's evaluation batches cover the data when asked for enough)."""
    return loader.fixed_batches(-(-len(loader.windows) // loader.batch_size))


def _run(
    net,
    cfg: FinetuneConfig,
    task: str,
    loaders: tuple[WindowLoader, WindowLoader | None],
    out: Path,
    tokenizer_dir: Path,
    run_info: dict,
    finish: Callable[[list[dict]], dict[str, str]],
    metrics_fn: Callable[[nn.Module], dict] | None = None,
) -> Path:
    """With the run folder locked: add adapters (when asked), run the training loop at the book's constant
    learning rate (no warmup, no clipping), then `finish(rows)` (which gives the model's metadata) and save.
    Under torchrun every process runs this; rank 0 alone writes."""
    rank, world = dist_info()
    lock = rank0_first(lambda: open_run(out) if rank == 0 else None)
    try:
        adapters = setup_lora(net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
        if adapters is not None:
            run_info = {**run_info, "lora": adapters}
        book = BOOK_DEFAULTS[task]
        skeleton = sharding_skeleton(net, {"strategy": cfg.strategy})
        rows = train(
            net,
            *loaders,
            out_dir=out,
            epochs=cfg.epochs if cfg.epochs is not None or cfg.max_steps is not None else book["epochs"],
            max_steps=cfg.max_steps,
            lr=cfg.lr,
            min_lr=cfg.lr,
            warmup_steps=0,
            grad_clip=0,
            weight_decay=cfg.weight_decay,
            train_layers=None if adapters is not None else cfg.train_layers or book["train_layers"],
            eval_every=cfg.eval_every,
            eval_batches=cfg.eval_batches,
            save_every=cfg.save_every,
            keep_checkpoints=cfg.keep_checkpoints,
            seed=cfg.seed,
            dtype=cfg.dtype,
            resume=cfg.resume,
            progress=cfg.progress,
            run_info={**run_info, "batch_size": cfg.batch_size},
            metrics_fn=metrics_fn,
            strategy=cfg.strategy,
            cpu_offload=cfg.cpu_offload,
            activation_checkpointing=cfg.activation_checkpointing,
            memory_check=cfg.memory_check,
        )
        save_trained(net, skeleton, out, tokenizer_dir, finish(rows), cfg.merge)
    finally:
        if lock is not None:
            lock.release()
        if world > 1:
            shutdown()
    if rank == 0:
        print(f"gpt2load: saved the fine-tuned model in {out} (and {out / 'final'})", flush=True)
    return out


def finetune_classify(
    model: str | Path,
    train_file: str | Path,
    val_file: str | Path,
    out: str | Path,
    *,
    test_file: str | Path | None = None,
    num_classes: int | None = None,
    max_length: int | None = None,
    pool: str = "last-real",
    config: FinetuneConfig | None = None,
    **options,
) -> Path:
    """Fine-tune `model` as a text classifier (the book's chapter 6) and save it in the run folder `out` (and
    `out/final`), which `load_gpt2(out)` loads.

    The output head is replaced by a new Linear(emb_dim, classes); by default the last block, the final norm
    and the head train (train_layers "last:1"), or only LoRA adapters and the head with `lora_rank`.

    Args:
        model: a size, alias or model folder (as for load_gpt2).
        train_file, val_file, test_file: CSV/TSV files with a header holding `text` and `label` columns.
        out: the run folder: metrics.jsonl, loss.png, accuracy.png, checkpoints/, the model, final/.
        num_classes: default the number the training labels need (at least 2).
        max_length: texts are cut to this many tokens (default the longest training text, capped at the
            context length); every text is padded to it, as in the book.
        pool: "last-real" (the last token of each text) or "last" (the last padded position, the book's).
        config, **options: a FinetuneConfig and/or its fields (epochs, lr, lora_rank, ...).
    """
    cfg = _settings(config, options)
    if pool not in POOLS:
        raise Gpt2LoadError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
    texts, labels = read_table(train_file, "--train")
    names = make_label_names(labels, num_classes, f"--train {train_file}")
    sets = {"--train": (train_file, texts, label_indices(labels, names, f"--train {train_file}"))}
    for flag, path in (("--val", val_file), ("--test", test_file)):
        if path is not None:
            t, lab = read_table(path, flag)
            sets[flag] = (path, t, label_indices(lab, names, f"{flag} {path}"))
    out = Path(out)
    net, enc, tokenizer_dir = _load(cfg, model)
    _check_length(max_length, net)
    if max_length is None:
        max_length = min(max(len(x) for x in encode_texts(enc, texts, 10**9, "")), net.cfg.context_length)
    data = {
        flag: ClassificationData(encode_texts(enc, t, max_length, f"{flag} {p}"), lab, max_length, pool)
        for flag, (p, t, lab) in sets.items()
    }
    with torch.random.fork_rng(devices=[]):  # the new head's initial weights follow the seed, nothing else
        torch.manual_seed(cfg.seed)
        net.out_head = nn.Linear(net.cfg.emb_dim, len(names)).to(net.tok_emb.weight.device)
    train_loader = _loader(data["--train"], cfg, True, f"--train {train_file}")
    val_loader = _loader(data["--val"], cfg, False, f"--val {val_file}")

    def accuracies(m: nn.Module) -> dict:
        return {
            "train_acc": accuracy(m, train_loader.fixed_batches(cfg.eval_batches)),
            "val_acc": accuracy(m, val_loader.fixed_batches(cfg.eval_batches)),
        }

    def finish(rows: list[dict]) -> dict[str, str]:
        final_row = {"step": rows[-1]["step"] if rows else 0, "final": True}
        for flag, key in (("--train", "train_acc"), ("--val", "val_acc"), ("--test", "test_acc")):
            if flag in data:
                final_row[key] = accuracy(net, _all_batches(_loader(data[flag], cfg, False, flag)))
        if dist_info()[0] == 0:
            _write_final_row(out, final_row, rows)
            shown = "  ".join(f"{k} {v:.2%}" for k, v in final_row.items() if k.endswith("_acc"))
            print(f"gpt2load: accuracy on the whole sets: {shown}", flush=True)
        return {CLASSIFIER_KEY: json.dumps({"labels": names, "pool": pool, "max_length": max_length})}

    info = {"task": "classify", "labels": names, "pool": pool, "max_length": max_length}
    return _run(net, cfg, "classify", (train_loader, val_loader), out, tokenizer_dir, info, finish, accuracies)


def _write_final_row(out: Path, row: dict, rows: list[dict]) -> None:
    """metrics.jsonl ends with one row of whole-set accuracies (replacing one from an earlier, resumed run)."""
    log = MetricsLog(out / "metrics.jsonl")
    kept = [r for r in log.rows() if not r.get("final")]
    with atomic_path(log.path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [*kept, row]), encoding="utf-8")
    curves = [r for r in rows if not r.get("final")]
    series = {"train_acc": "train", "val_acc": "validation"}
    if not plot_curves(curves, out / "accuracy.png", series, "step", "accuracy"):
        print("gpt2load: matplotlib is not installed, so no accuracy.png (pip install 'gpt2load[plot]')")


def finetune_instruct(
    model: str | Path,
    data_file: str | Path,
    out: str | Path,
    *,
    val_file: str | Path | None = None,
    mask_prompt: bool = False,
    max_length: int | None = None,
    config: FinetuneConfig | None = None,
    **options,
) -> Path:
    """Instruction fine-tuning on Alpaca-format JSON (the book's chapter 7); saves the model in `out` (and
    `out/final`), which records `prompt_template: alpaca` so that `generate --instruction` and the server wrap
    prompts the same way.

    Args:
        model: a size, alias or model folder.
        data_file, val_file: JSON lists of {"instruction", "input", "output"} records.
        out: the run folder: metrics.jsonl, loss.png, checkpoints/, the model, final/.
        mask_prompt: count only the response's targets (the instruction part is -100).
        max_length: examples are cut to this many tokens (default the context length).
        config, **options: a FinetuneConfig and/or its fields (epochs, lr, lora_rank, ...).
    """
    cfg = _settings(config, options)
    records = {"--data": (data_file, read_instructions(data_file, "--data"))}
    if val_file is not None:
        records["--val-data"] = (val_file, read_instructions(val_file, "--val-data"))
    out = Path(out)
    net, enc, tokenizer_dir = _load(cfg, model)
    if net.out_head.out_features != net.cfg.vocab_size:
        raise Gpt2LoadError(
            f"{model} is a classifier (its head has {net.out_head.out_features} outputs), "
            "not a language model: fine-tune a language model for instructions"
        )
    _check_length(max_length, net)
    length = max_length or net.cfg.context_length
    data = {flag: encode_instructions(enc, r, length, f"{flag} {p}", mask_prompt) for flag, (p, r) in records.items()}
    train_loader = _loader(data["--data"], cfg, True, f"--data {data_file}")
    val_loader = _loader(data["--val-data"], cfg, False, "--val-data") if val_file else None
    info = {"task": "instruct", "mask_prompt": mask_prompt, "max_length": length}
    meta = {TEMPLATE_KEY: "alpaca"}
    return _run(net, cfg, "instruct", (train_loader, val_loader), out, tokenizer_dir, info, lambda rows: meta)


__all__ = ["FinetuneConfig", "accuracy", "finetune_classify", "finetune_instruct"]
