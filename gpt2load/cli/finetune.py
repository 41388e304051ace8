"""`gpt2load finetune classify|instruct` and `gpt2load classify`: argument parsing only; the work is in
finetune.finetune_classify / finetune_instruct and classify.classify_texts."""

from __future__ import annotations

import argparse
import json

from ..model.lora import DEFAULT_ALPHA, DEFAULT_TARGETS, TARGET_MODULES
from .common import n_heads_arg

EPILOG = """\
Writes OUT/metrics.jsonl, OUT/loss.png (and accuracy.png for classify; both need the plot extra),
OUT/checkpoints/step-NNNNNN.pt and the fine-tuned model in OUT itself and OUT/final (use it with --model OUT)."""


def add_lora_args(p: argparse.ArgumentParser) -> None:
    """--lora-rank/--lora-alpha/--lora-targets/--no-merge, shared by train and both fine-tuning recipes."""
    g = p.add_argument_group("LoRA (train low-rank adapters only)")
    g.add_argument("--lora-rank", type=int, default=None, help="adapter rank, e.g. 8 or 16 (default: no LoRA)")
    g.add_argument("--lora-alpha", type=float, default=DEFAULT_ALPHA, help=f"update scale (default {DEFAULT_ALPHA:g})")
    g.add_argument(
        "--lora-targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"Linears to adapt, comma-separated from {', '.join(TARGET_MODULES)} (default %(default)s)",
    )
    g.add_argument("--no-merge", action="store_true", help="keep the adapters apart instead of merging them")


def lora_kwargs(args: argparse.Namespace) -> dict:
    return {
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_targets": args.lora_targets,
        "merge": not args.no_merge,
    }


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """--strategy/--cpu-offload/--activation-checkpointing/--no-memory-check, shared by train and fine-tuning."""
    g = p.add_argument_group("memory and several processes (torchrun)")
    g.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="under torchrun: ddp (a full copy per process, default) or fsdp (weights, gradients and optimizer "
        "state sharded across the processes)",
    )
    g.add_argument("--cpu-offload", action="store_true", help="with --strategy fsdp: keep the shards in host memory")
    g.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="recompute each block's activations in the backward instead of keeping them",
    )
    g.add_argument(
        "--no-memory-check", action="store_true", help="train even when the memory estimate exceeds the device's"
    )


def parallel_kwargs(args: argparse.Namespace) -> dict:
    return {
        "strategy": args.strategy,
        "cpu_offload": args.cpu_offload,
        "activation_checkpointing": args.activation_checkpointing,
        "memory_check": not args.no_memory_check,
    }


def _config(args: argparse.Namespace):
    from ..finetune.recipes import FinetuneConfig

    return FinetuneConfig(
        train_layers=args.train_layers,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        seed=args.seed,
        dtype=args.dtype,
        resume=args.resume,
        progress=False if args.quiet else None,
        source=args.source,
        weights_dir=args.weights_dir,
        device=args.device,
        quiet=args.quiet,
        n_heads=args.n_heads,
        **lora_kwargs(args),
        **parallel_kwargs(args),
    )


def cmd_finetune_classify(args: argparse.Namespace) -> int:
    from ..finetune.recipes import finetune_classify

    finetune_classify(
        args.model,
        args.train,
        args.val,
        args.out,
        test_file=args.test,
        num_classes=args.num_classes,
        max_length=args.max_length,
        pool=args.pool,
        config=_config(args),
    )
    return 0


def cmd_finetune_instruct(args: argparse.Namespace) -> int:
    from ..finetune.recipes import finetune_instruct

    finetune_instruct(
        args.model,
        args.data,
        args.out,
        val_file=args.val_data,
        mask_prompt=args.mask_prompt,
        max_length=args.max_length,
        config=_config(args),
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from ..finetune.classify import classify_texts, parse_labels

    result = classify_texts(
        args.model,
        args.text,
        source=args.source,
        weights_dir=args.weights_dir,
        device=args.device,
        dtype=args.dtype,
        n_heads=args.n_heads,
        labels=None if args.labels is None else parse_labels(args.labels),
        pool=args.pool,
        max_length=args.max_length,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    for text, r in zip(args.text, result["results"], strict=True):
        probs = ", ".join(f"{label} {p:.3f}" for label, p in r["probs"].items())
        print(f"{r['label']}\t({probs})\t{text}")
    return 0


def _shared(p: argparse.ArgumentParser, train_layers: str, epochs: int) -> None:
    """The flags both recipes share (FinetuneConfig's fields); defaults shown are the book's for the recipe."""
    p.add_argument("--model", default="124M", help="size or alias (124M, gpt2-medium, ...) or a local path")
    p.add_argument("--source", choices=("hf", "openai"), default="hf", help="where sizes download from")
    p.add_argument("--weights-dir", default=None, help="download folder (default $GPT2LOAD_WEIGHTS_DIR or ./weights)")
    n_heads_arg(p)
    p.add_argument("--out", required=True, help="run folder: metrics, plots, checkpoints and the final model")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help=f"passes over the data (default {epochs})")
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run instead")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=8, help="examples per batch (default 8)")
    opt.add_argument("--lr", type=float, default=5e-5, help="learning rate, constant (default 5e-5)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    opt.add_argument("--train-layers", default=None, help=f"all or last:N (default {train_layers})")
    opt.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16 = autocast")
    opt.add_argument("--seed", type=int, default=123)
    opt.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    ev = p.add_argument_group("evaluation and checkpoints")
    ev.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (default 50)")
    ev.add_argument("--eval-batches", type=int, default=5, help="batches per evaluation (default 5)")
    ev.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default 500)")
    ev.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in OUT")
    add_lora_args(p)
    add_parallel_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or download messages")


def add_finetune_parsers(subparsers) -> None:
    """Add `finetune classify`, `finetune instruct` and `classify` to gpt2load's subparsers."""
    f = subparsers.add_parser("finetune", help="fine-tune a classifier or an instruction follower (book ch. 6-7)")
    kinds = f.add_subparsers(dest="task", required=True)
    c = kinds.add_parser(
        "classify",
        help="text classification from a CSV/TSV file",
        description="Fine-tune a text classifier (the book's chapter 6): a new head, trained on a CSV or TSV "
        "file with a header holding 'text' and 'label' columns.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--train", required=True, help="training examples (.csv or .tsv with text and label columns)")
    c.add_argument("--val", required=True, help="validation examples, same format")
    c.add_argument("--test", default=None, help="test examples, same format (test_acc at the end)")
    c.add_argument("--num-classes", type=int, default=None, help="default: what the training labels need")
    c.add_argument("--max-length", type=int, default=None, help="tokens per text (default: longest training text)")
    c.add_argument(
        "--pool", choices=("last", "last-real"), default="last-real", help="position classified (default last-real)"
    )
    _shared(c, "last:1", 5)
    c.set_defaults(func=cmd_finetune_classify)

    i = kinds.add_parser(
        "instruct",
        help="instruction following from Alpaca-format JSON",
        description="Instruction fine-tuning (the book's chapter 7) on a JSON list of "
        '{"instruction", "input", "output"} records, formatted with the Alpaca template.',
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("--data", required=True, help="training records (JSON list)")
    i.add_argument("--val-data", default=None, help="validation records (JSON list)")
    i.add_argument("--mask-prompt", action="store_true", help="train on the response only (prompt targets -100)")
    i.add_argument("--max-length", type=int, default=None, help="tokens per example (default: the context length)")
    _shared(i, "all", 2)
    i.set_defaults(func=cmd_finetune_instruct)

    k = subparsers.add_parser(
        "classify", help="classify texts with a classifier (finetune classify's OUT, or the book's chapter 6 .pth)"
    )
    k.add_argument(
        "--model",
        required=True,
        help="a classifier: the OUT of finetune classify, or any model whose head has one output per class",
    )
    k.add_argument("--source", choices=("hf", "openai"), default="hf", help=argparse.SUPPRESS)
    k.add_argument("--weights-dir", default=None, help=argparse.SUPPRESS)
    n_heads_arg(k)
    k.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    k.add_argument(
        "--labels",
        default=None,
        metavar="A,B,...",
        help="class names in the head's order, e.g. ham,spam (default: what the model records, else 0,1,...)",
    )
    k.add_argument(
        "--pool",
        choices=("last", "last-real"),
        default=None,
        help="position classified: last-real (the text's last token) or last (the book's: padded to --max-length; "
        "default: what the model records, else last-real)",
    )
    k.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per text (default: what the model records, else its context length)",
    )
    k.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    k.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    k.add_argument("--json", action="store_true", help='print {"results": [{"label", "probs"}]}')
    k.set_defaults(func=cmd_classify)
