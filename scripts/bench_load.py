"""Loading benchmark: cold-process time to the first generated token and peak RSS, gpt2load vs transformers,
plus the one-time conversion from an OpenAI TensorFlow checkpoint. Random weights in the real layouts.

gpt2load's time is measured twice: with a warm kernel store (the usual case: the kernels were measured by an
earlier process on this machine) and with an empty one (a machine's first run, which measures them), each with
the seconds that process spent measuring. The children keep their kernel store and C library in the work
folder (XDG_CACHE_HOME), never in ~/.cache.

    python scripts/bench.py load [--sizes 124M,1558M] [--repeats 3] [--workdir /tmp/gpt2load-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tfwrite import write_checkpoint  # noqa: E402

from gpt2load.formats.cache import cache_file  # noqa: E402
from gpt2load.formats.layouts import open_source  # noqa: E402
from gpt2load.formats.names import OPENAI, expected_shapes, to_source_layout  # noqa: E402
from gpt2load.model.config import GPTConfig  # noqa: E402

# Peak RSS of this process since exec (VmHWM; ru_maxrss would include the parent's peak before exec).
RSS = (
    "import re; hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
    "print(json.dumps({'rss': int(hwm) * 1024, **globals().get('extra', {})}))"
)
CHILD = {
    "import": "import json, torch\n" + RSS,
    "gpt2load": (
        "import json, torch, gpt2load\n"
        "m = gpt2load.load_gpt2(FOLDER, device='cpu')\n"
        "out = gpt2load.generate(m, torch.tensor([[464, 3290, 318]]), max_new_tokens=1)\n"
        "from gpt2load.fast.kernelstore import machine_store\nfrom gpt2load.fast.registry import shared_kernels\n"
        "from gpt2load.settings import Settings\n"
        "s = Settings.from_env(); k = shared_kernels(s.kernels, machine_store(s))\n"
        "extra = {'calibration': k.calibration_seconds, 'measurements': k.measurements}\n" + RSS
    ),
    "transformers": (
        "import json, torch\nfrom transformers import GPT2LMHeadModel\n"
        "m = GPT2LMHeadModel.from_pretrained(FOLDER, dtype=torch.float32).eval()\n"
        "out = m.generate(torch.tensor([[464, 3290, 318]]), max_new_tokens=1, do_sample=False, pad_token_id=0)\n" + RSS
    ),
    "convert": (
        "import json\nfrom gpt2load.formats.cache import cached_source\n"
        "from gpt2load.formats.layouts import open_source\n"
        "cached_source(open_source(FOLDER), quiet=True)\n" + RSS
    ),
}


def run_child(kind: str, folder: Path, env: dict | None = None) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS bytes, what else it printed) of a fresh Python process doing one job."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD[kind].replace("FOLDER", repr(str(folder)))],
        capture_output=True,
        text=True,
        env=env,
    )
    elapsed = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{kind} child failed:\n{out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return elapsed, info.pop("rss"), info


def make_weights(cfg: GPTConfig, root: Path) -> tuple[Path, Path]:
    """Random weights of cfg's shape as an OpenAI checkpoint folder and a transformers folder."""
    from gpt2load.formats.exports import export_hf
    from gpt2load.model.build import model_from_tensors

    openai_dir, hf_dir = root / "openai", root / "hf"
    if (openai_dir / "model.ckpt.index").exists() and (hf_dir / "model.safetensors").exists():
        return openai_dir, hf_dir
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in expected_shapes(cfg).items()}
    model = model_from_tensors(cfg, state.items(), device="cpu")
    export_hf(model, hf_dir)
    hp = {
        "n_vocab": cfg.vocab_size,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
    }
    write_checkpoint(openai_dir, to_source_layout(state, OPENAI, cfg), hp)
    return openai_dir, hf_dir


def bench_size(name: str, workdir: Path, repeats: int, import_rss: int) -> list[str]:
    cfg = GPTConfig.from_name(name)
    model_bytes = 4 * cfg.n_params
    openai_dir, hf_dir = make_weights(cfg, workdir / name)
    os.environ["GPT2LOAD_CACHE_DIR"] = str(workdir / "cache")  # the children's conversion cache, not ~/.cache
    conv = []
    for _ in range(repeats):
        cache_file(open_source(openai_dir)).unlink(missing_ok=True)
        conv.append(run_child("convert", openai_dir))
    cache_file(open_source(hf_dir)).unlink(missing_ok=True)
    run_child("convert", hf_dir)  # gpt2load's one-time cache of the HF files, not timed here
    env = {**os.environ, "XDG_CACHE_HOME": str(workdir / "xdg")}  # the kernel store (and C library) of this run
    store = workdir / "xdg" / "gpt2load" / "kernels"
    run_child("gpt2load", hf_dir, env)  # builds the C library there once, not timed
    empty, ours, theirs = [], [], []
    for _ in range(repeats):  # interleaved, so a burst of load on a shared machine hits all three
        shutil.rmtree(store, ignore_errors=True)
        empty.append(run_child("gpt2load", hf_dir, env))  # measures the kernels and keeps them
        ours.append(run_child("gpt2load", hf_dir, env))  # finds them
        theirs.append(run_child("transformers", hf_dir))

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    def calibration(rows):
        seconds = statistics.median(r[2]["calibration"] for r in rows)
        return f"{seconds:.2f} s measuring {max(r[2]['measurements'] for r in rows)} choices"

    budget = 1.15 * model_bytes + import_rss
    gb = 1e9
    return [
        f"| {name} | load → first token (s), warm kernel store | {med(ours, 0):.2f} ({calibration(ours)}) | "
        f"{med(theirs, 0):.2f} | {med(theirs, 0) / med(ours, 0):.2f}× faster |",
        f"| {name} | load → first token (s), empty kernel store | {med(empty, 0):.2f} ({calibration(empty)}) | "
        f"{med(theirs, 0):.2f} | {med(theirs, 0) / med(empty, 0):.2f}× faster |",
        f"| {name} | peak RSS (GB) | {med(ours, 1) / gb:.2f} | {med(theirs, 1) / gb:.2f} | "
        f"budget {budget / gb:.2f} = 1.15 × {model_bytes / gb:.2f} + import {import_rss / gb:.2f} |",
        f"| {name} | OpenAI → cache conversion | {model_bytes / 1e6 / med(conv, 0):.0f} MB/s, {med(conv, 0):.1f} s, "
        f"peak RSS {med(conv, 1) / gb:.2f} GB | – | budget {budget / gb:.2f} GB |",
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="124M,1558M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/gpt2load-bench")
    p.add_argument("--keep", action="store_true", help="keep the generated weights")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    import_rss = statistics.median(run_child("import", workdir)[1] for _ in range(3))
    rows = ["| size | measure | gpt2load | transformers | ratio / budget |", "|---|---|---|---|---|"]
    for name in args.sizes.split(","):
        rows += bench_size(name, workdir, args.repeats, import_rss)
        print("\n".join(rows[-4:]), flush=True)
    print(f"\nmachine: {torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats} runs")
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
