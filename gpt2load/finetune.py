"""The book's fine-tuning workflows as recipes: a classifier (chapter 6) and an instruction follower
(chapter 7), each optionally through LoRA adapters (appendix E).

Both run the ordinary training loop (checkpoints, exact resume, metrics.jsonl) on (input, target) batches
from finetune_data; a classifier's targets are -100 except at the pooled position, so its loss is the book's
cross-entropy over that position's logits of the new head. The result lands in OUT/final in gpt2load's own
form with what using it needs in the file's metadata: `classifier` (labels, pool, max_length) or
`prompt_template`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .build import pick_device
from .data import WindowLoader
from .errors import Gpt2LoadError
from .export import save_finetuned
from .finetune_data import (
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
from .load import load_gpt2, load_tokenizer, model_folder
from .lora import DEFAULT_ALPHA, DEFAULT_TARGETS, check_lora_settings, parse_targets, setup_lora
from .stfile import atomic_path
from .train import MetricsLog, train

CLASSIFIER_KEY = "classifier"  # metadata: {"labels": [...], "pool": ..., "max_length": N}
TEMPLATE_KEY = "prompt_template"  # metadata: the name of the template in templates.TEMPLATES
BOOK_DEFAULTS = {"classify": {"epochs": 5}, "instruct": {"epochs": 2}}  # chapters 6 and 7


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float | None:
    """Share of counted targets (not -100) where the model's top logit is the target; None without any."""
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
    return correct / total if total else None


def plot_accuracy(rows: Sequence[dict], path: Path) -> bool:
    """accuracy.png: train/validation accuracy against steps; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and not r.get("final")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return True


def _check_lora(lora_rank: int | None, lora_alpha: float, lora_targets) -> None:
    if lora_rank is not None:
        check_lora_settings(lora_rank, lora_alpha)
        parse_targets(lora_targets)


def _load(model, source, weights_dir, device, quiet):
    """(model in float32, tokenizer, the folder its tokenizer files are in)."""
    net = load_gpt2(model, source, weights_dir, device=device, quiet=quiet)
    enc = load_tokenizer(model, source, weights_dir)
    where = model_folder(model, source, weights_dir, quiet=True)
    return net, enc, where if where.is_dir() else where.parent


def _check_length(max_length: int | None, net) -> None:
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise Gpt2LoadError(f"--max-length must be a positive integer, got {max_length!r}")
    if max_length is not None and max_length > net.cfg.context_length:
        raise Gpt2LoadError(
            f"--max-length {max_length} exceeds the model's context length {net.cfg.context_length}: lower it"
        )


def _loader(data, batch_size: int, shuffle: bool, seed: int, what: str):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise Gpt2LoadError(f"--batch-size must be a positive integer, got {batch_size!r}")
    loader = WindowLoader(data, batch_size, shuffle=shuffle, seed=seed)
    if shuffle and len(loader) == 0:
        raise Gpt2LoadError(
            f"{what} has {len(data)} examples, fewer than one batch of {batch_size}: lower --batch-size or add data"
        )
    return loader


def _all_batches(loader):
    """Every example once, in order (WindowLoader's evaluation batches cover the data when asked for enough)."""
    return loader.fixed_batches(-(-len(loader.windows) // loader.batch_size))


def _run(
    net,
    train_loader,
    val_loader,
    out: Path,
    *,
    lora_rank: int | None,
    lora_alpha: float,
    lora_targets,
    train_layers: str,
    epochs: int | None,
    max_steps: int | None,
    task: str,
    metrics_fn: Callable[[nn.Module], dict] | None,
    run_info: dict,
    **options,
) -> list[dict]:
    """Add adapters (when asked), then the training loop with the book's constant learning rate."""
    lora = setup_lora(net, lora_rank, lora_alpha, lora_targets, options.get("seed", 123))
    if lora is not None:
        run_info = {**run_info, "lora": lora}
    if epochs is None and max_steps is None:
        epochs = BOOK_DEFAULTS[task]["epochs"]
    lr = options.pop("lr")
    return train(
        net,
        train_loader,
        val_loader,
        out_dir=out,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        min_lr=lr,  # the book fine-tunes at a constant rate, without warmup or clipping
        warmup_steps=0,
        grad_clip=0,
        train_layers=None if lora is not None else train_layers,
        run_info=run_info,
        metrics_fn=metrics_fn,
        **options,
    )


def _save_final(net, out: Path, tokenizer_dir: Path, metadata: dict[str, str], merge: bool) -> Path:
    final = save_finetuned(net, out / "final", tokenizer_dir, metadata, merge)
    print(f"gpt2load: saved the fine-tuned model in {final}", flush=True)
    return final


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
    train_layers: str = "last:1",
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int = 8,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_batches: int = 5,
    lora_rank: int | None = None,
    lora_alpha: float = DEFAULT_ALPHA,
    lora_targets: str | Sequence[str] = DEFAULT_TARGETS,
    merge: bool = True,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    quiet: bool = False,
    **options,
) -> Path:
    """Fine-tune `model` as a text classifier (the book's chapter 6) and save it in `out/final`.

    The output head is replaced by a new Linear(emb_dim, classes); by default the last block, the final norm
    and the head train (`train_layers="last:1"`), or only LoRA adapters and the head with `lora_rank`.

    Args:
        model: a size, alias or model folder (as for load_gpt2).
        train_file, val_file, test_file: CSV/TSV files with a header holding `text` and `label` columns.
        out: the run folder: metrics.jsonl, loss.png, accuracy.png, checkpoints/, final/.
        num_classes: default the number the training labels need (at least 2).
        max_length: texts are cut to this many tokens (default the longest training text, capped at the
            context length); every text is padded to it, as in the book.
        pool: "last-real" (the last token of each text) or "last" (the last padded position, the book's).
        train_layers: "all" or "last:N" (ignored with LoRA).
        epochs, max_steps: the length of the run (default the book's 5 epochs).
        batch_size, lr, weight_decay, eval_every, eval_batches: as for `train` (lr is constant, the book's).
        lora_rank, lora_alpha, lora_targets: train LoRA adapters instead (see lora.add_lora).
        merge: fold the adapters into the saved model (False keeps them in the checkpoints only).
        **options: passed to `train` (seed, dtype, resume, save_every, keep_checkpoints, progress).
    """
    if pool not in POOLS:
        raise Gpt2LoadError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
    _check_lora(lora_rank, lora_alpha, lora_targets)
    texts, labels = read_table(train_file, "--train")
    names = make_label_names(labels, num_classes, f"--train {train_file}")
    sets = {"--train": (train_file, texts, label_indices(labels, names, f"--train {train_file}"))}
    for flag, path in (("--val", val_file), ("--test", test_file)):
        if path is not None:
            t, lab = read_table(path, flag)
            sets[flag] = (path, t, label_indices(lab, names, f"{flag} {path}"))
    out = Path(out)
    net, enc, tokenizer_dir = _load(model, source, weights_dir, pick_device(device), quiet)
    _check_length(max_length, net)
    if max_length is None:
        max_length = min(max(len(x) for x in encode_texts(enc, texts, 10**9, "")), net.cfg.context_length)
    data = {
        flag: ClassificationData(encode_texts(enc, t, max_length, f"{flag} {p}"), lab, max_length, pool)
        for flag, (p, t, lab) in sets.items()
    }
    seed = options.get("seed", 123)
    with torch.random.fork_rng(devices=[]):  # the new head's initial weights follow the seed, nothing else
        torch.manual_seed(seed)
        net.out_head = nn.Linear(net.cfg.emb_dim, len(names)).to(net.tok_emb.weight.device)
    train_loader = _loader(data["--train"], batch_size, True, seed, f"--train {train_file}")
    val_loader = _loader(data["--val"], batch_size, False, seed, f"--val {val_file}")

    def accuracies(m: nn.Module) -> dict:
        return {
            "train_acc": accuracy(m, train_loader.fixed_batches(eval_batches)),
            "val_acc": accuracy(m, val_loader.fixed_batches(eval_batches)),
        }

    info = {"task": "classify", "labels": names, "pool": pool, "max_length": max_length, "batch_size": batch_size}
    rows = _run(
        net,
        train_loader,
        val_loader,
        out,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        train_layers=train_layers,
        epochs=epochs,
        max_steps=max_steps,
        task="classify",
        metrics_fn=accuracies,
        run_info=info,
        lr=lr,
        weight_decay=weight_decay,
        eval_every=eval_every,
        eval_batches=eval_batches,
        **options,
    )
    final_row = {"step": rows[-1]["step"] if rows else 0, "final": True}
    for flag, key in (("--train", "train_acc"), ("--val", "val_acc"), ("--test", "test_acc")):
        if flag in data:
            final_row[key] = accuracy(net, _all_batches(_loader(data[flag], batch_size, False, seed, flag)))
    _write_final_row(out, final_row, rows)
    shown = "  ".join(f"{k} {v:.2%}" for k, v in final_row.items() if k.endswith("_acc"))
    print(f"gpt2load: accuracy on the whole sets: {shown}", flush=True)
    meta = {CLASSIFIER_KEY: json.dumps({"labels": names, "pool": pool, "max_length": max_length})}
    return _save_final(net, out, tokenizer_dir, meta, merge)


def _write_final_row(out: Path, row: dict, rows: list[dict]) -> None:
    """metrics.jsonl ends with one row of whole-set accuracies (replacing one from an earlier, resumed run)."""
    log = MetricsLog(out / "metrics.jsonl")
    kept = [r for r in log.rows() if not r.get("final")]
    with atomic_path(log.path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in [*kept, row]), encoding="utf-8")
    if not plot_accuracy(rows, out / "accuracy.png"):
        print("gpt2load: matplotlib is not installed, so no accuracy.png (pip install 'gpt2load[plot]')")


def finetune_instruct(
    model: str | Path,
    data_file: str | Path,
    out: str | Path,
    *,
    val_file: str | Path | None = None,
    mask_prompt: bool = False,
    max_length: int | None = None,
    train_layers: str = "all",
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int = 8,
    lr: float = 5e-5,
    weight_decay: float = 0.1,
    eval_every: int = 50,
    eval_batches: int = 5,
    lora_rank: int | None = None,
    lora_alpha: float = DEFAULT_ALPHA,
    lora_targets: str | Sequence[str] = DEFAULT_TARGETS,
    merge: bool = True,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    quiet: bool = False,
    **options,
) -> Path:
    """Instruction fine-tuning on Alpaca-format JSON (the book's chapter 7); saves `out/final`, which records
    `prompt_template: alpaca` so that `generate --instruction` and the server wrap prompts the same way.

    Args:
        model: a size, alias or model folder.
        data_file, val_file: JSON lists of {"instruction", "input", "output"} records.
        out: the run folder: metrics.jsonl, loss.png, checkpoints/, final/.
        mask_prompt: count only the response's targets (the instruction part is -100).
        max_length: examples are cut to this many tokens (default the context length).
        train_layers: "all" (default, the book's) or "last:N" (ignored with LoRA).
        epochs, max_steps: the length of the run (default the book's 2 epochs).
        lora_rank, lora_alpha, lora_targets, merge: LoRA adapters instead of full fine-tuning.
        **options: passed to `train` (seed, dtype, resume, save_every, keep_checkpoints, progress, ...).
    """
    _check_lora(lora_rank, lora_alpha, lora_targets)
    records = {"--data": (data_file, read_instructions(data_file, "--data"))}
    if val_file is not None:
        records["--val-data"] = (val_file, read_instructions(val_file, "--val-data"))
    out = Path(out)
    net, enc, tokenizer_dir = _load(model, source, weights_dir, pick_device(device), quiet)
    if net.out_head.out_features != net.cfg.vocab_size:
        raise Gpt2LoadError(
            f"{model} is a classifier (its head has {net.out_head.out_features} outputs), "
            "not a language model: fine-tune a language model for instructions"
        )
    _check_length(max_length, net)
    length = max_length or net.cfg.context_length
    data = {
        flag: encode_instructions(enc, recs, length, f"{flag} {p}", mask_prompt) for flag, (p, recs) in records.items()
    }
    seed = options.get("seed", 123)
    train_loader = _loader(data["--data"], batch_size, True, seed, f"--data {data_file}")
    val_loader = _loader(data["--val-data"], batch_size, False, seed, "--val-data") if val_file else None
    info = {"task": "instruct", "mask_prompt": mask_prompt, "max_length": length, "batch_size": batch_size}
    _run(
        net,
        train_loader,
        val_loader,
        out,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_targets=lora_targets,
        train_layers=train_layers,
        epochs=epochs,
        max_steps=max_steps,
        task="instruct",
        metrics_fn=None,
        run_info=info,
        lr=lr,
        weight_decay=weight_decay,
        eval_every=eval_every,
        eval_batches=eval_batches,
        **options,
    )
    return _save_final(net, out, tokenizer_dir, {TEMPLATE_KEY: "alpaca"}, merge)


__all__ = ["accuracy", "finetune_classify", "finetune_instruct"]
