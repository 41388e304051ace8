"""What several subcommands' parsers share."""

from __future__ import annotations

import argparse

MAX_HEADS = 1 << 12  # GPTConfig's range for n_heads


def _heads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_HEADS:
        raise argparse.ArgumentTypeError(f"{value} is out of range: use 1 to {MAX_HEADS}")
    return value


def n_heads_arg(p: argparse.ArgumentParser) -> None:
    """--n-heads: what a book-layout .pth (a state_dict without a config) of a width no GPT-2 size has needs."""
    p.add_argument(
        "--n-heads",
        type=_heads,
        default=None,
        metavar="N",
        help="attention heads of a book-layout .pth whose width no GPT-2 size has (the file does not record it)",
    )


def model_args(p: argparse.ArgumentParser, positional: bool = False, heads: bool = True) -> None:
    """--model (or a positional model), --source and --weights-dir, and --n-heads unless `heads` is False."""
    if positional:
        p.add_argument("model", help="size or alias (124M, 355M, 774M, 1558M, gpt2, gpt2-xl, ...) or a local path")
    else:
        p.add_argument(
            "--model",
            default="124M",
            help="size or alias (124M, 355M, 774M, 1558M, gpt2, ...) or a local path (default 124M)",
        )
    p.add_argument("--source", choices=("hf", "openai"), default="hf", help="where sizes download from (default hf)")
    p.add_argument("--weights-dir", default=None, help="download folder (default $GPT2LOAD_WEIGHTS_DIR or ./weights)")
    if heads:
        n_heads_arg(p)
