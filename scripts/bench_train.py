"""Training speed: gpt2load's loop (fp32 and bf16 autocast) against a plain transformers GPT2LMHeadModel loop.

Same 124M-shaped random weights, same batch and context, same AdamW settings, in one run. Prints a markdown table
of training tokens/s, the ratio to transformers fp32, and model FLOPs utilisation (6·N·tokens/s over a measured
peak matmul rate of this machine in the same dtype).

    python scripts/bench_train.py [--batch 4] [--context 256] [--steps 2] [--warmup 1] [--rounds 2] [--threads N]

--memory [--size 355M]: per-process memory of one training step of gpt2load's loop under DDP and under FSDP, two
processes each (torchrun, gloo, CPU), batch 1 × 64 tokens so that weights, gradients and AdamW state dominate:
the bytes of weights + gradients + optimizer state each process holds, and its peak RSS growth, beside
training/memory.py's estimate. --table prints the estimator's table for the four sizes.
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


def _rss_peak() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def _rss_now() -> float:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(strategy: str, size: str, out: str) -> None:
    """Under torchrun: one step of gpt2load.train on a random `size` model; rank 0 writes what each rank held."""
    import json

    import torch.distributed as dist

    from gpt2load.model.config import GPTConfig
    from gpt2load.model.gpt import GPTModel
    from gpt2load.training.distributed import init_distributed, shutdown
    from gpt2load.training.loop import train

    rank, world, _ = init_distributed("cpu")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_name(size))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, (1, 65), generator=g)
    batches = [(x[:, :-1], x[:, 1:])] * 2
    held = {}

    def count(optimizer, args, kwargs) -> None:
        """At the optimizer step: the bytes of weights, gradients and AdamW state this process holds."""

        def local(t):
            return (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()

        params = [p for group in optimizer.param_groups for p in group["params"]]
        held["weights"] = sum(local(p) for p in params)
        held["gradients"] = sum(local(p.grad) for p in params if p.grad is not None)
        held["optimizer"] = sum(local(v) for st in optimizer.state.values() for v in st.values() if v.dim() > 0)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    hook = register_optimizer_step_post_hook(count)
    base = _rss_now()  # the model is built: what training adds on top of it
    train(model, batches, max_steps=1, eval_every=0, eval_batches=1, strategy=strategy, progress=False)
    hook.remove()
    state = {**held, "rss_peak_growth": _rss_peak() - base}
    rows = [None] * world
    dist.all_gather_object(rows, state)
    if rank == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    shutdown()


def bench_memory(size: str) -> None:
    import json
    import subprocess
    import tempfile

    from gpt2load.model.config import GPTConfig
    from gpt2load.model.gpt import GPTModel
    from gpt2load.training.memory import Plan, estimate

    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with torch.device("meta"):
        meta = GPTModel(GPTConfig.from_name(size))
    print(f"\n{size}: one training step, 2 processes (gloo, CPU), batch 1 × 64 tokens, float32, AdamW")
    print(f"torch {torch.__version__}; {_cpu_name()}\n")
    print(
        "| strategy | held at the step: weights + gradients + AdamW | estimate (with buckets / gathered units) "
        "| peak RSS growth over the step |"
    )
    print("|---|---:|---:|---:|")
    got = {}
    for i, strategy in enumerate(("ddp", "fsdp")):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
            cmd += ["--master_port", str(29900 + i), __file__, "--memory-worker", strategy, size, str(out)]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = json.loads(out.read_text())
        est = estimate(meta, Plan(strategy, 2, torch.float32, 1, 64))
        state = est.weights + est.gradients + est.optimizer + est.working
        got[strategy] = max(r["weights"] + r["gradients"] + r["optimizer"] for r in rows)
        rss = max(r["rss_peak_growth"] for r in rows)
        print(f"| {strategy} | {got[strategy] / 1e9:.2f} GB | {state / 1e9:.2f} GB | {rss / 1e9:.2f} GB |")
    print(f"\nFSDP / DDP, weights + gradients + AdamW per process: {got['fsdp'] / got['ddp']:.2f}")


def memory_table() -> None:
    """The estimator's per-process memory for the four sizes (float32 AdamW; activations for 8 × 1024)."""
    from gpt2load.model.config import GPTConfig
    from gpt2load.model.gpt import GPTModel
    from gpt2load.training.memory import Plan, estimate

    print("| size | DDP, 2 processes | FSDP, 2 processes | FSDP, 4 | FSDP, 8 | activations 8 × 1024 bf16 (with AC) |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in ("124M", "355M", "774M", "1558M"):
        with torch.device("meta"):
            m = GPTModel(GPTConfig.from_name(size))
        cells = []
        for strategy, world in (("ddp", 2), ("fsdp", 2), ("fsdp", 4), ("fsdp", 8)):
            e = estimate(m, Plan(strategy, world, torch.float32, 8, 1024))
            cells.append(f"{(e.weights + e.gradients + e.optimizer + e.working) / 1e9:.1f} GB")
        act = estimate(m, Plan("fsdp", 8, torch.bfloat16, 8, 1024)).activations
        ac = estimate(m, Plan("fsdp", 8, torch.bfloat16, 8, 1024, activation_checkpointing=True)).activations
        print(f"| {size} | {' | '.join(cells)} | {act / 1e9:.1f} GB ({ac / 1e9:.1f} GB) |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--memory-worker"]:
        memory_worker(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", action="store_true", help="per-process memory under DDP and FSDP (2 processes)")
    p.add_argument("--size", default="355M", help="model shape for --memory (default 355M)")
    p.add_argument("--table", action="store_true", help="the memory estimator's table for the four sizes")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per loop and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, in every round")
    p.add_argument("--rounds", type=int, default=2, help="the loops take turns this often; the best round counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.table:
        memory_table()
        return 0
    if args.memory:
        bench_memory(args.size)
        return 0
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
