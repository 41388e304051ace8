"""`gpt2load train`: argument parsing only; the work is `gpt2load.training.pretrain.train_on_files`."""

from __future__ import annotations

import argparse

from .common import n_heads_arg
from .finetune import add_lora_args, add_parallel_args, lora_kwargs, parallel_kwargs

EPILOG = """\
Writes OUT/metrics.jsonl, OUT/loss.png, OUT/checkpoints/step-NNNNNN.pt and the trained model in OUT itself
(and OUT/final): gpt2load generate --model OUT. One run per OUT at a time. Multi-process:
torchrun --nproc_per_node N -m gpt2load train ... (--batch-size is per process; --strategy fsdp shards the model,
gradients and optimizer state across the processes)."""


def cmd_train(args: argparse.Namespace) -> int:
    from ..training.pretrain import train_on_files

    train_on_files(
        args.model,
        args.data,
        args.out,
        val_data=args.val_data,
        val_ratio=args.val_ratio,
        context_length=args.context_length,
        stride=args.stride,
        batch_size=args.batch_size,
        dropout=args.dropout,
        source=args.source,
        weights_dir=args.weights_dir,
        device=args.device,
        cache_dir=args.cache_dir,
        quiet=args.quiet,
        max_steps=args.max_steps,
        epochs=args.epochs,
        grad_accum=args.grad_accum,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        dtype=args.dtype,
        train_layers=args.train_layers,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        seed=args.seed,
        sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens,
        progress=False if args.quiet else None,
        n_heads=args.n_heads,
        **lora_kwargs(args),
        **parallel_kwargs(args),
    )
    return 0


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand to gpt2load's subparsers."""
    p = subparsers.add_parser(
        "train",
        help="continue pretraining on text files",
        description="Continue pretraining a GPT-2 model on UTF-8 text files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="124M", help="size or alias (124M, gpt2-medium, ...) or a local path")
    p.add_argument("--source", choices=("hf", "openai"), default="hf", help="where sizes download from (default hf)")
    p.add_argument("--weights-dir", default=None, help="download folder (default $GPT2LOAD_WEIGHTS_DIR or ./weights)")
    n_heads_arg(p)
    data = p.add_argument_group("data")
    data.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of .txt")
    data.add_argument("--val-data", nargs="+", default=None, metavar="PATH", help="separate validation text")
    data.add_argument("--val-ratio", type=float, default=0.1, help="held-out share of --data (default 0.1; 0: none)")
    data.add_argument("--context-length", type=int, default=None, help="window length (default: the model's)")
    data.add_argument("--stride", type=int, default=None, help="step between windows (default: context length)")
    data.add_argument("--cache-dir", default=None, help="token cache folder (default OUT/tokens)")
    p.add_argument("--out", required=True, help="run folder: metrics, plots, checkpoints and the final model")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run")
    length.add_argument("--epochs", type=int, default=None, help="passes over the data (default 1)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--batch-size", type=int, default=8, help="windows per batch, per process (default 8)")
    opt.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    opt.add_argument("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    opt.add_argument("--warmup-steps", type=int, default=None, help="linear warmup (default 5%% of the steps)")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1.0)")
    opt.add_argument("--dropout", type=float, default=0.0, help="drop rate while training (default 0)")
    opt.add_argument("--train-layers", default="all", help="all (default) or last:N blocks + final norm")
    opt.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="bfloat16 = autocast")
    opt.add_argument("--seed", type=int, default=123)
    opt.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    ev = p.add_argument_group("evaluation and checkpoints")
    ev.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default 100)")
    ev.add_argument("--eval-batches", type=int, default=10, help="batches per evaluation (default 10)")
    ev.add_argument("--sample-prompt", default=None, help="print a greedy sample of this prompt at evaluations")
    ev.add_argument("--sample-tokens", type=int, default=40, help="tokens per sample (default 40)")
    ev.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default 500)")
    ev.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept (default 3)")
    ev.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in OUT")
    add_lora_args(p)
    add_parallel_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or download messages")
    p.set_defaults(func=cmd_train)
    return p
