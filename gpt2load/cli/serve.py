"""`gpt2load serve`: argument parsing only; the work is `gpt2load.serve.serve`."""

from __future__ import annotations

import argparse

from .common import model_args


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serve import serve

    serve(
        args.model,
        args.source,
        args.weights_dir,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        api_key_file=args.api_key_file,
        allowed_hosts=tuple(h for h in args.allowed_hosts.split(",") if h.strip()),
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
        log_prompts=args.log_prompts,
        max_body_bytes=args.max_body_bytes,
        max_choices=args.max_choices,
        max_queued_choices=args.max_queued_choices,
        max_logprob_entries=args.max_logprob_entries,
        n_heads=args.n_heads,
    )
    return 0


def add_serve_parser(sub) -> None:
    s = sub.add_parser(
        "serve",
        help="serve a model over HTTP: OpenAI's API, batching across requests, a page at /",
        description="Serve a model with OpenAI's completions and chat API (any openai client works) and a page "
        "to try it at /. Needs the serve extra: pip install 'gpt2load[serve]'.",
    )
    model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 requests (visible to other local users in the process "
        "list: prefer --api-key-file or the GPT2LOAD_API_KEY environment variable)",
    )
    s.add_argument("--api-key-file", default=None, metavar="PATH", help="read the API key from this file")
    s.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAMES",
        help="comma-separated Host names to answer besides loopback and the bound address ('*': any; for a "
        "reverse proxy or a LAN name)",
    )
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    s.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only Linear layers and head")
    s.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda, then mps, then cpu)")
    s.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503 (default 64)")
    s.add_argument("--max-tokens-limit", type=int, default=None, help="most tokens a request may ask for")
    s.add_argument("--log-prompts", action="store_true", help="also log prompt text (never logged otherwise)")
    s.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body (default 2 MiB)")
    s.add_argument("--max-choices", type=int, default=128, help="prompts x n (or num_beams) per request (default 128)")
    s.add_argument(
        "--max-queued-choices",
        type=int,
        default=None,
        help="choices waiting for a row, all requests together (default 4096)",
    )
    s.add_argument(
        "--max-logprob-entries",
        type=int,
        default=131_072,
        help="tokens x (logprobs+1) x choices in one answer (default 131072, a few MB of JSON)",
    )
    s.set_defaults(func=cmd_serve)
