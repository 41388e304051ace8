"""Command line: argument parsing only; every subcommand calls one API function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable

from .errors import Gpt2LoadError


def _bool_or_never(text: str) -> bool | str:
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError("use true, false or never")
    return value


def _model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
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


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import PromptTruncatedWarning, complete
    from .load import load_gpt2, load_tokenizer

    quiet = args.json or args.quiet
    instructed = args.instruction is not None
    if args.input is not None and not instructed:
        raise Gpt2LoadError("--input goes with --instruction (it is the instruction's input): add --instruction")
    prompt = instruction_prompt(args) if instructed else args.prompt
    model = load_gpt2(args.model, args.source, args.weights_dir, args.device, args.dtype, quiet=quiet)
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
    from .load import model_metadata
    from .templates import TEMPLATES, format_instruction

    template = model_metadata(args.model, args.source, args.weights_dir).get("prompt_template")
    if template is None:
        print("gpt2load: notice: the model records no prompt template; using the Alpaca template", file=sys.stderr)
    elif template not in TEMPLATES:
        raise Gpt2LoadError(
            f"{args.model} records the prompt template {template!r}, which this gpt2load does not know "
            f"({', '.join(TEMPLATES)}): upgrade gpt2load or use --prompt"
        )
    return format_instruction(args.instruction, args.input or "")


def cmd_convert(args: argparse.Namespace) -> int:
    from .export import export
    from .load import load_gpt2, model_folder
    from .lora import merge_lora

    model = merge_lora(load_gpt2(args.model, args.source, args.weights_dir, device="cpu", quiet=args.quiet))
    where = model_folder(args.model, args.source, args.weights_dir, quiet=True)
    out = export(model, args.to, args.out, tokenizer_dir=where if where.is_dir() else where.parent)
    print(f"wrote {out}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .info import info

    data = info(args.model, args.source, args.weights_dir)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        for key, value in data.items():
            print(f"{key + ':':<16}{value}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import download

    path = download(args.model, args.source, args.weights_dir, revision=args.revision, quiet=args.quiet)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt2load",
        description="OpenAI's GPT-2 weights in the book's GPTModel: download, convert, generate, train.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt", description="Generate text from a prompt.")
    _model_args(g)
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue ('' starts from <|endoftext|>)")
    what.add_argument("--instruction", help="an instruction for an instruction-tuned model: prints only the response")
    g.add_argument("--input", default=None, help="the instruction's input (with --instruction)")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--min-new-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", type=_bool_or_never, default=False, metavar="{true,false,never}")
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="export weights as safetensors, a transformers folder or a book .pth")
    _model_args(c)
    c.add_argument("--to", required=True, choices=("safetensors", "hf", "pth"))
    c.add_argument("--out", required=True, help="output file (.safetensors, .pth) or folder (hf, safetensors)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a model size or a local model")
    _model_args(i, positional=True)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("download", help="download a model's files (resumable, verified)")
    _model_args(d, positional=True)
    d.add_argument("--revision", default="main", help="Hugging Face revision (default main)")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_download)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub) -> None:
    """Subcommands whose parsers live beside their modules (training has many flags)."""
    from .finetune_cli import add_finetune_parsers
    from .train_cli import add_train_parser

    add_train_parser(sub)
    add_finetune_parsers(sub)


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
    except KeyboardInterrupt:
        print("gpt2load: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
