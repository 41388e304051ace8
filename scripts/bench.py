"""Benchmarks that measure gpt2load against a reference side by side, in one run on one machine.

    python scripts/bench.py generate [options]   # decoding speed vs transformers (scripts/bench_generate.py)
    python scripts/bench.py load [options]       # scripts/bench_load.py
    python scripts/bench.py train [options]      # scripts/bench_train.py
    python scripts/bench.py serve [options]      # server throughput at 1/4/8 clients (scripts/bench_serve.py)
    python scripts/bench.py convert [options]    # export MB/s and peak RSS per format (scripts/bench_convert.py)

Each subcommand lives in scripts/bench_<name>.py, imported only when asked for, and exposes
`main(argv: list[str]) -> int | None`; `python scripts/bench.py NAME --help` shows its options.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

COMMANDS = {
    "generate": "bench_generate",
    "load": "bench_load",
    "train": "bench_train",
    "serve": "bench_serve",
    "convert": "bench_convert",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python scripts/bench.py {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    name = COMMANDS[argv[0]]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    return importlib.import_module(name).main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
