"""Decoding speed of gpt2load against transformers' GPT2LMHeadModel.generate, side by side in one run.

Both models hold the same random weights of the real 124M shape (fp32, torch's default thread count). Each case
is warmed up, then run --reps times alternating the two libraries (so load changes hit both alike); the table
shows medians, and checks that both produced the same tokens. Also prints the memory-bandwidth bound of
decoding on this machine: every new token reads all the weights once.

    python scripts/bench.py generate [--reps 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the oracle: same weights in both

from oracle import pair  # noqa: E402

from gpt2load import generate  # noqa: E402
from gpt2load.beam import beam_search  # noqa: E402
from gpt2load.config import GPTConfig  # noqa: E402
from gpt2load.model import param_count  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def side_by_side(ref_fn, ours_fn, reps: int):
    """Median seconds of each (warm-up first, runs alternating) and the last outputs."""
    ref_out, ours_out = ref_fn(), ours_fn()
    ref_t, ours_t = [], []
    for _ in range(reps):
        t, ref_out = timed(ref_fn)
        ref_t.append(t)
        t, ours_out = timed(ours_fn)
        ours_t.append(t)
    return statistics.median(ref_t), statistics.median(ours_t), ref_out, ours_out


def bandwidth(mbytes: int = 500) -> tuple[float, float]:
    """Memory bandwidth in bytes/s: torch copying a large fp32 tensor (bytes read + written), and summing it
    (bytes read: the access pattern of decoding, which streams the weights through the matmuls)."""
    src = torch.ones(mbytes * 250_000)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = min(timed(lambda: dst.copy_(src))[0] for _ in range(5))
    read = min(timed(src.sum)[0] for _ in range(5))
    nbytes = src.numel() * 4
    return 2 * nbytes / copy, nbytes / read


def profile_decoding(model, idx, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    generate(model, idx, 5)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate(model, idx, steps)
    print(f"\ngpt2load greedy decoding, {steps} tokens, by operator and input shape:\n")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=10))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--new-tokens", type=int, default=200, help="greedy: new tokens")
    p.add_argument("--beam-tokens", type=int, default=100, help="beam search: new tokens")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prefill", type=int, default=1000, help="prefill: prompt length")
    p.add_argument("--profile", action="store_true", help="also profile gpt2load's decoding by operator")
    args = p.parse_args(argv)

    import transformers

    cfg = GPTConfig.from_name("124M")
    hf, ours = pair(cfg, seed=0)
    hf.generation_config.eos_token_id = None  # both decode the full length: equal work, comparable tokens
    hf.generation_config.pad_token_id = 0
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 10), generator=gen)
    long_prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen)
    ones = torch.ones_like

    load = os.getloadavg()[0]
    bw_copy, bw_read = bandwidth()
    rows = []
    n = args.new_tokens
    ref_t, ours_t, ref, got = side_by_side(
        lambda: hf.generate(prompt, attention_mask=ones(prompt), do_sample=False, max_new_tokens=n),
        lambda: generate(ours, prompt, n),
        args.reps,
    )
    rows.append(
        (
            f"greedy, batch 1, {prompt.shape[1]}-token prompt, {n} new tokens",
            n / ref_t,
            n / ours_t,
            ref_t / ours_t,
            torch.equal(ref, got),
            "tokens/s",
        )
    )

    n, k = args.beam_tokens, args.beams
    ref_t, ours_t, ref, got = side_by_side(
        lambda: hf.generate(prompt, attention_mask=ones(prompt), do_sample=False, num_beams=k, max_new_tokens=n),
        lambda: beam_search(ours, prompt, n, k, eos_id=None).sequences,
        args.reps,
    )
    rows.append(
        (
            f"beam search, {k} beams, {n} new tokens",
            n / ref_t,
            n / ours_t,
            ref_t / ours_t,
            torch.equal(ref, got),
            "tokens/s",
        )
    )

    n = args.prefill
    ref_t, ours_t, ref, got = side_by_side(
        lambda: hf.generate(long_prompt, attention_mask=ones(long_prompt), do_sample=False, max_new_tokens=1),
        lambda: generate(ours, long_prompt, 1),
        args.reps,
    )
    rows.append(
        (
            f"prefill, {n}-token prompt (time to first token)",
            n / ref_t,
            n / ours_t,
            ref_t / ours_t,
            torch.equal(ref, got),
            "prompt tokens/s",
        )
    )

    print(
        f"\ngpt2load vs transformers {transformers.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, fp32, 124M shape, random weights, median of {args.reps}; "
        f"1-minute load average before the run {load:.1f})\n"
    )
    print("| case | transformers | gpt2load | speed-up | same tokens |")
    print("|---|---:|---:|---:|:---:|")
    for name, ref_rate, ours_rate, ratio, same, unit in rows:
        print(f"| {name} | {ref_rate:.1f} {unit} | {ours_rate:.1f} {unit} | {ratio:.2f}x | {'yes' if same else 'NO'} |")

    weight_bytes = (param_count(ours) - cfg.context_length * cfg.emb_dim) * 4  # one position row only
    rate = rows[0][2]
    print(
        f"\nbatch-1 decoding reads all {weight_bytes / 1e6:.0f} MB of weights per token. Memory bandwidth: "
        f"{bw_copy / 1e9:.1f} GB/s by memcpy (500 MB copied, read + write), {bw_read / 1e9:.1f} GB/s reading "
        f"only; bound: {bw_copy / weight_bytes:.1f} / {bw_read / weight_bytes:.1f} tokens/s. gpt2load greedy: "
        f"{rate:.1f} tokens/s = {100 * rate * weight_bytes / bw_copy:.0f}% / "
        f"{100 * rate * weight_bytes / bw_read:.0f}% of the bound ({rate * weight_bytes / 1e9:.1f} GB/s)."
    )
    if args.profile:
        profile_decoding(ours, prompt, 50)
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
