"""Command line: argument parsing only; every subcommand calls one API function."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Callable

from ..errors import Gpt2LoadError
from ..fsutil import check_output
from .common import model_args
from .finetune import add_finetune_parsers
from .serve import add_serve_parser
from .train import add_train_parser

MAX_NEW_TOKENS = 1_000_000  # hours of decoding even for 124M: anything larger is a typo
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line and exit 1, like every other gpt2load failure."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(1, f"gpt2load: error: {message} (see `{self.prog} --help`)\n")


def whole(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a whole number from lo to hi, refused with one line before anything runs."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {lo} to {hi:,}")
        return value

    return parse


def finite(text: str) -> float:
    """An argparse type: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _bool_or_never(text: str) -> bool | str:
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError("use true, false or never")
    return value


def _no_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="convert OpenAI/HF weights in memory instead of caching the conversion in $GPT2LOAD_CACHE_DIR "
        "(default ~/.cache/gpt2load/converted); GPT2LOAD_NO_CACHE=1 does the same",
    )


def _cache(args: argparse.Namespace) -> bool | None:
    return False if args.no_cache else None  # None: the environment decides


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generation.decoding import PromptTruncatedWarning
    from ..generation.text import complete
    from ..load import load_gpt2, load_tokenizer

    quiet = args.json or args.quiet
    instructed = args.instruction is not None
    if args.input is not None and not instructed:
        raise Gpt2LoadError("--input goes with --instruction (it is the instruction's input): add --instruction")
    prompt = instruction_prompt(args) if instructed else args.prompt
    model = load_gpt2(
        args.model,
        args.source,
        args.weights_dir,
        args.device,
        args.dtype,
        quiet=quiet,
        cache=_cache(args),
        quantize=args.quantize,
        n_heads=args.n_heads,
    )
    enc = load_tokenizer(args.model, args.source, args.weights_dir)
    streaming = not args.json and args.num_beams == 1 and args.num_return_sequences == 1

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if streaming and not instructed:  # an instruction prints only the response
        on_text(prompt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        result = complete(
            model,
            enc,
            prompt,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop=args.stop,
            seed=args.seed,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            early_stopping=args.early_stopping,
            num_return_sequences=args.num_return_sequences,
            on_text=on_text if streaming else None,
        )
    for w in caught:
        if issubclass(w.category, PromptTruncatedWarning):
            print(f"gpt2load: notice: {w.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    elif streaming:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(result["completions"]):
            score = f" (score {c['score']:.4f})" if c["score"] is not None else ""
            print(f"--- {i + 1}{score}\n{'' if instructed else prompt}{c['text']}")
    return 0


def instruction_prompt(args: argparse.Namespace) -> str:
    """--instruction/--input wrapped in the template the model records (Alpaca when it records none)."""
    from ..generation.templates import TEMPLATES, format_instruction
    from ..load import model_metadata

    template = model_metadata(args.model, args.source, args.weights_dir, n_heads=args.n_heads).get("prompt_template")
    if template is None:
        print("gpt2load: notice: the model records no prompt template; using the Alpaca template", file=sys.stderr)
    elif template not in TEMPLATES:
        raise Gpt2LoadError(
            f"{args.model} records the prompt template {template!r}, which this gpt2load does not know "
            f"({', '.join(TEMPLATES)}): upgrade gpt2load or use --prompt"
        )
    return format_instruction(args.instruction, args.input or "")


def cmd_convert(args: argparse.Namespace) -> int:
    from ..formats.exports import export, is_folder_output, load_dtype
    from ..formats.relayout import NonFiniteWeightsWarning
    from ..load import load_gpt2, model_folder
    from ..model.lora import merge_lora

    # the output is checked before the (slow) load, and again by the writer
    where = model_folder(args.model, args.source, args.weights_dir, quiet=args.quiet)
    check_output(args.out, args.to, folder=is_folder_output(args.to, args.out), force=args.force, protect=[where])
    dtype = load_dtype(args.to, args.dtype)
    model = load_gpt2(
        args.model,
        args.source,
        args.weights_dir,
        device="cpu",
        dtype=dtype,
        quiet=args.quiet,
        cache=_cache(args),
        n_heads=args.n_heads,
    )
    merge_lora(model)  # a model saved with --no-merge is exported as the one model it computes
    folder = where if where.is_dir() else where.parent
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteWeightsWarning)
        out = export(
            model,
            args.to,
            args.out,
            tokenizer_dir=folder,
            dtype=args.dtype,
            force=args.force,
            protect=[where],
            dequantize=args.dequantize,
            strict=args.strict,
        )
    for w in caught:  # one line each, not Python's two-line warning format
        if issubclass(w.category, NonFiniteWeightsWarning):
            print(f"gpt2load: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..info import info

    if args.tensors:
        return _print_tensors(args)
    data = info(args.model, args.source, args.weights_dir, n_heads=args.n_heads)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(key) for key in data) + 2
        for key, value in data.items():
            print(f"{key + ':':<{width}}{value}")
    return 0


def _print_tensors(args: argparse.Namespace) -> int:
    from ..tensors import tensor_table

    rows = tensor_table(args.model, args.layout, args.source, args.weights_dir, args.adapters, n_heads=args.n_heads)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['name']:<{width}}  {shape:<16} {r['dtype']:<9} {r['bytes']:>14,}")
    print(f"{len(rows)} tensors, {sum(r['bytes'] for r in rows):,} bytes")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..hub.fetch import download

    path = download(args.model, args.source, args.weights_dir, revision=args.revision, quiet=args.quiet)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpt2load",
        description="OpenAI's GPT-2 weights in the book's GPTModel: download, convert, generate, train.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt", description="Generate text from a prompt.")
    model_args(g)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue ('' starts from <|endoftext|>)")
    what.add_argument("--instruction", help="an instruction for an instruction-tuned model: prints only the response")
    g.add_argument("--input", default=None, help="the instruction's input (with --instruction)")
    g.add_argument("--max-new-tokens", type=whole(0, MAX_NEW_TOKENS), default=50)
    g.add_argument("--min-new-tokens", type=whole(0, MAX_NEW_TOKENS), default=0)
    g.add_argument("--temperature", type=finite, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=whole(0, 2**31 - 1), default=None)
    g.add_argument("--top-p", type=finite, default=None)
    g.add_argument("--repetition-penalty", type=finite, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--seed", type=whole(0, MAX_SEED), default=None)
    g.add_argument("--num-beams", type=whole(1, 1000), default=1)
    g.add_argument("--length-penalty", type=finite, default=1.0)
    g.add_argument("--early-stopping", type=_bool_or_never, default=False, metavar="{true,false,never}")
    g.add_argument("--num-return-sequences", type=whole(1, 1000), default=1)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    g.add_argument("--quantize", choices=("int8",), default=None, help="int8: int8 weight-only Linear layers and head")
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    _no_cache_arg(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "convert", help="export weights as safetensors, a transformers folder, a book .pth, GGUF or llm.c's .bin"
    )
    model_args(c)
    c.add_argument("--to", required=True, choices=("safetensors", "hf", "pth", "gguf", "llmc", "nanogpt"))
    c.add_argument("--out", required=True, help="output file (.safetensors, .pth, .gguf) or folder (hf, safetensors)")
    c.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0"),
        default=None,
        help="float32, bfloat16 or float16 (default: as stored); for gguf f32, f16 (default), bf16 or q8_0; "
        "for llmc float32 or bfloat16",
    )
    c.add_argument("--force", action="store_true", help="replace an earlier gpt2load output of this format at --out")
    c.add_argument("--dequantize", action="store_true", help="write an int8 model's weights as float32")
    c.add_argument(
        "--strict", action="store_true", help="refuse to write NaN or infinite weights (default: warn and write)"
    )
    c.add_argument("--quiet", action="store_true")
    _no_cache_arg(c)
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a model size or a local model")
    model_args(i, positional=True)
    i.add_argument("--json", action="store_true")
    i.add_argument("--tensors", action="store_true", help="list every tensor: name, shape, dtype, bytes")
    i.add_argument(
        "--layout", choices=("book", "hf", "openai"), default="book", help="tensor names for --tensors (default book)"
    )
    i.add_argument(
        "--adapters",
        choices=("merge", "list"),
        default="merge",
        help="a model saved with unmerged LoRA adapters: --tensors shows them merged (default) or listed (book)",
    )
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("download", help="download a model's files (resumable, verified)")
    model_args(d, positional=True, heads=False)
    d.add_argument("--revision", default="main", help="Hugging Face revision (default main)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_download)

    add_serve_parser(sub)
    add_train_parser(sub)  # training's and fine-tuning's many flags live beside them
    add_finetune_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Gpt2LoadError as e:
        print(f"gpt2load: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the disk or the file system, not gpt2load: say which file and why
        where = f" {e.filename}" if e.filename else ""
        print(f"gpt2load: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:  # e.g. under a ulimit: say so in one line, not a traceback from deep inside torch
        print(
            "gpt2load: error: out of memory: use a smaller model or --dtype bfloat16, or free memory", file=sys.stderr
        )
        return 1
    except KeyboardInterrupt:
        print("gpt2load: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
