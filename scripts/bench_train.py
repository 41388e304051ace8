"""Training speed: gpt2load's loop (fp32 and bf16 autocast) against a plain transformers GPT2LMHeadModel loop.

Same 124M-shaped random weights, same batch and context, same AdamW settings, in one run. Prints a markdown table
of training tokens/s, the ratio to transformers fp32, and model FLOPs utilisation (6·N·tokens/s over a measured
peak matmul rate of this machine in the same dtype).

    python scripts/bench_train.py [--batch 4] [--context 256] [--steps 2] [--warmup 1] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def peak_matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    """Best observed FLOP/s of an n×n matmul: the machine's practical peak in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def models(context: int):
    """A random transformers GPT-2 (124M shape) and a GPTModel holding the same weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle: same weights in both
    from oracle import pair

    from gpt2load.model.config import GPTConfig

    return pair(GPTConfig(context_length=max(context, 1024)))


def bench_transformers(hf, batches, warmup: int, lr: float) -> list[float]:
    """A plain loop: labels=input_ids (the model shifts them), AdamW, clipping; tokens/s of each step."""
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, weight_decay=0.1)
    rates = []
    for i, (x, _) in enumerate(batches):
        t = time.perf_counter()
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            rates.append(x.numel() / (time.perf_counter() - t))
    return rates


def bench_gpt2load(model, batches, warmup: int, lr: float, dtype: str) -> list[float]:
    """gpt2load.train itself, evaluating after every step (one batch, not timed) to read per-step tokens/s."""
    from gpt2load.training.loop import train

    rows = train(
        model,
        batches,
        max_steps=len(batches),
        lr=lr,
        warmup_steps=0,
        dtype=dtype,
        eval_every=1,
        eval_batches=1,
        progress=False,
        log=lambda msg: None,
    )
    return [r["tokens_per_s"] for r in rows[1 + warmup :]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per loop and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, in every round")
    p.add_argument("--rounds", type=int, default=2, help="the loops take turns this often; the best round counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 50257, (n_steps, args.batch, args.context + 1), generator=g)
    batches = [(r[:, :-1], r[:, 1:]) for r in rows]
    hf, ours = models(args.context)
    from gpt2load.model.gpt import param_count

    n_params = param_count(ours)
    peak = {"float32": peak_matmul_flops(torch.float32), "bfloat16": peak_matmul_flops(torch.bfloat16)}
    loops = {
        ("transformers GPT2LMHeadModel", "float32"): lambda: bench_transformers(hf, batches, args.warmup, 1e-4),
        ("gpt2load train()", "float32"): lambda: bench_gpt2load(ours, batches, args.warmup, 1e-4, "float32"),
        ("gpt2load train()", "bfloat16"): lambda: bench_gpt2load(ours, batches, args.warmup, 1e-4, "bfloat16"),
    }
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):  # taking turns, so that a burst of load elsewhere hits every loop alike
        for key, run in loops.items():
            best[key] = max(best.get(key, 0.0), statistics.median(run()))

    print(
        f"\nbatch {args.batch} × context {args.context}; {args.steps} timed steps after {args.warmup} warmup, "
        f"best of {args.rounds} rounds; {n_params / 1e6:.1f}M parameters; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {_cpu_name()}; bf16/AMX flags: {', '.join(_cpu_flags()) or 'none'}; "
        f"load average {_load()}"
    )
    print(
        f"peak matmul (2048², best of 8): float32 {peak['float32'] / 1e9:.0f} GFLOP/s, "
        f"bfloat16 {peak['bfloat16'] / 1e9:.0f} GFLOP/s\n"
    )
    base = best[("transformers GPT2LMHeadModel", "float32")]
    print("| training loop | compute dtype | tokens/s | vs transformers fp32 | MFU |")
    print("|---|---|---:|---:|---:|")
    for (name, dtype), tps in best.items():
        mfu = 6 * n_params * tps / peak[dtype]
        label = "bf16 autocast" if dtype == "bfloat16" else "fp32"
        print(f"| {name} | {label} | {tps:,.0f} | {tps / base:.2f}× | {mfu:.0%} |")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in have if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    return []


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
