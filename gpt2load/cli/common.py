"""What several subcommands' parsers share."""

from __future__ import annotations

import argparse


def model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    """--model (or a positional model), --source and --weights-dir."""
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
