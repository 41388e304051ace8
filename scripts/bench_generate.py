"""Decoding speed of gpt2load against transformers' GPT2LMHeadModel.generate, side by side in one run.

Both libraries hold the same random weights of the real 124M shape. Each case is warmed up, then run --reps times
(the prefill rows three times as many) alternating the two libraries (so load changes hit both alike); the table
shows medians and whether both produced the same tokens. Rows: fp32 greedy, beam search and prefill; bfloat16
greedy and prefill (both libraries in bf16); int8 weight-only greedy (against transformers in fp32, and against
gpt2load's own fp32) with its fidelity to fp32 on a teacher-forced 512-token text; greedy over 8 left-padded
prompts; fp32 greedy and beam search at the 1558M shape (random weights written once to a temporary folder in
transformers' layout, loaded by both libraries from there). Also the CPU, its flags that matter (AMX, AVX512-BF16,
VNNI), the memory bandwidth, and each decoding row's share of the bound (weights read per step / bandwidth). With
llama-cpp-python installed, a second table puts llama.cpp beside gpt2load at each precision on GGUF files of the
same weights (scripts/bench_llama.py).

    python scripts/bench.py generate [--reps 3] [--sizes 124M,1558M] [--profile] [--no-llama] [--llama-src DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the oracle: same weights in both

from bench_llama import add_llama_options, llama_bench  # noqa: E402
from helpers import TOKENIZER_DIR  # noqa: E402
from oracle import hf_config, pair  # noqa: E402

from gpt2load import generate, left_pad  # noqa: E402
from gpt2load.generation.beam import beam_search  # noqa: E402
from gpt2load.model.config import GPTConfig  # noqa: E402
from gpt2load.model.quant import fidelity, quantize_model  # noqa: E402
from gpt2load.tokenizer import tokenizer_from_folder  # noqa: E402

FLAGS = {"AMX": ("amx_tile", "amx_bf16"), "AVX512-BF16": ("avx512_bf16",), "VNNI": ("avx512_vnni", "avx_vnni")}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(fns: list, reps: int) -> tuple[list[float], list]:
    """Median seconds of each function (one warm-up each, then `reps` rounds calling each in turn, so a change
    of load on the shared machine hits all of them alike) and their last outputs."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t, outs[i] = timed(fn)
            times[i].append(t)
    return [statistics.median(t) for t in times], outs


def cpu_info() -> tuple[str, dict[str, bool]]:
    """The CPU model name and which of the flags that matter for the kernels it has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown", {}
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return name, {k: any(f in flags for f in names) for k, names in FLAGS.items()}


def weight_bytes(model) -> int:
    """Bytes one decoding step reads: every weight but the float embeddings (one row each is looked up); the
    head's matrix, tied or not (an int8 model's tok_emb.qweight is the head's)."""
    seen = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in ("tok_emb.weight", "pos_emb.weight"):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    w = getattr(model.out_head, "weight", None)
    if w is not None:
        seen[w.data_ptr()] = w.numel() * w.element_size()
    return sum(seen.values())


_RSS_PROBE = """
import sys, torch
from gpt2load import generate, load_gpt2
def rss():
    fields = dict(ln.split(":", 1) for ln in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) * 1024
before = rss()
model = load_gpt2(sys.argv[1], device="cpu", quantize=sys.argv[2] or None)
loaded = rss() - before
generate(model, torch.tensor([[1, 2, 3]]), 5)
print(loaded, rss() - before)
"""


def resident_bytes(model, folder: Path, quantize: str = "") -> tuple[int, int]:
    """How much a fresh process's resident memory grows to load `model` from gpt2load's own form (saved in
    `folder`, quantized on loading if `quantize`), then to decode 5 tokens: the weights it really touches,
    memory-mapped (paged in when used) or copied, and then also decoding's own buffers."""
    import subprocess

    from gpt2load import save_model

    if not folder.exists():
        save_model(model, folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _RSS_PROBE, str(folder), quantize]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return -1, -1
    loaded, decoded = out.stdout.strip().splitlines()[-1].split()
    return int(loaded), int(decoded)


def held_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each tensor once (a tied head shares the embedding's)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


def big_pair(size: str, folder: Path):
    """transformers and gpt2load models of `size` with the same random weights, written once to `folder` as a
    transformers folder (safetensors) and loaded from there by each library (gpt2load through its cache)."""
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    from gpt2load import load_gpt2

    cfg = GPTConfig.from_name(size)
    hf_cfg = hf_config(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT2LMHeadModel(hf_cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue  # tied to wte
        t = torch.randn(shape, generator=gen)
        # as tests/oracle.py: nonzero biases and LayerNorms, a wide embedding so greedy choices are not near-ties
        scale = 0.5 if name.endswith("wte.weight") else 0.1 if name.endswith("bias") or ".ln_" in name else 0.02
        t.mul_(scale)
        if ".ln_" in name and name.endswith("weight"):
            t.add_(1.0)
        tensors[name] = t
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    hf_cfg.save_pretrained(folder)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    os.environ["GPT2LOAD_CACHE_DIR"] = str(folder / "cache")
    return hf, load_gpt2(folder, device="cpu", quiet=True), cfg


def big_rows(t: Table, size: str, n: int, nb: int, k: int, llama=None) -> None:
    """fp32 greedy and beam-search rows at `size`; then `llama(size, model, prompt, folder)` if given (the llama.cpp
    rows), with transformers' copy freed first."""
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, cfg = big_pair(size, Path(tmp))
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        prompt = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
        step_bytes = weight_bytes(ours)
        t.case(
            f"{size} fp32 greedy, {n} new tokens",
            lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n),
            lambda: generate(ours, prompt, n),
            n,
            "tok/s",
            step_bytes,
            n,
        )
        t.case(
            f"{size} fp32 beam search, {k} beams, {nb} new tokens",
            lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=k, max_new_tokens=nb
            ),
            lambda: beam_search(ours, prompt, nb, k, eos_id=None).sequences,
            nb,
            "tok/s",
            step_bytes,
            nb,
        )
        if llama is not None:
            del hf
            llama(size, ours, prompt, Path(tmp))


def profile_decoding(model, idx, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    generate(model, idx, 5)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate(model, idx, steps)
    print(f"\ngpt2load greedy decoding, {steps} tokens, by operator and input shape:\n")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=10))


class Table:
    """Rows measured one at a time: transformers, gpt2load, an optional gpt2load baseline and a memcpy of 500 MB
    (the bandwidth at that moment) in turn."""

    def __init__(self, reps: int) -> None:
        self.reps, self.rows, self.bandwidths = reps, [], []
        src = torch.ones(125_000_000)
        dst = torch.empty_like(src)
        self._copy = lambda: dst.copy_(src)
        self._copy_bytes = 2 * src.numel() * 4  # read + written

    def case(self, name, ref_fn, ours_fn, work, unit, step_bytes=None, steps=0, base_fn=None, base_work=0, reps=None):
        """Time ref vs ours (and ours vs `base_fn`, `base_work` units per run); `work` units per run;
        `step_bytes` read per decoding step, `steps` steps per run; `reps` instead of the table's. Returns
        (ours / base rate, ours' output)."""
        fns = [ref_fn, ours_fn, self._copy] + ([base_fn] if base_fn else [])
        (ref_t, ours_t, copy_t, *base_t), (ref, got, *_) = interleaved(fns, reps or self.reps)
        bw = self._copy_bytes / copy_t
        self.bandwidths.append(bw)
        share = f"{100 * steps / ours_t * step_bytes / bw:.0f}%" if step_bytes else "—"
        vs_base = (work / ours_t) / (base_work / base_t[0]) if base_fn else None
        row = [name, f"{work / ref_t:.1f} {unit}", f"{work / ours_t:.1f} {unit}", ref_t / ours_t]
        self.rows.append(row + [torch.equal(ref, got), share, vs_base, bw])
        return vs_base, got

    def print(self) -> None:
        print(
            "| case | transformers | gpt2load | vs transformers | vs base (see below) | same tokens | "
            "share of bandwidth bound (memcpy GB/s then) |"
        )
        print("|---|---:|---:|---:|---:|:---:|---:|")
        for name, ref, ours, ratio, same, share, vs_base, bw in self.rows:
            same_s = same if isinstance(same, str) else ("yes" if same else "NO")
            base = f"{vs_base:.2f}x" if vs_base is not None else "—"
            print(f"| {name} | {ref} | {ours} | {ratio:.2f}x | {base} | {same_s} | {share} ({bw / 1e9:.1f}) |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.py generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--new-tokens", type=int, default=100, help="greedy: new tokens")
    p.add_argument("--beam-tokens", type=int, default=50, help="beam search: new tokens")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--prefill", type=int, default=1000, help="prefill: prompt length")
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    p.add_argument("--sizes", default="124M,1558M", help="124M rows always; 1558M adds its greedy and beam rows")
    p.add_argument("--big-tokens", type=int, default=20, help="1558M rows: new tokens (greedy and beam)")
    p.add_argument("--baseline", metavar="REV", help="also time gpt2load at git revision REV in the fp32 rows")
    p.add_argument("--profile", action="store_true", help="also profile gpt2load's decoding by operator")
    add_llama_options(p)
    args = p.parse_args(argv)
    llama, error = llama_bench(args, TOKENIZER_DIR)
    if error:
        print(error, file=sys.stderr)
        return 1

    import transformers

    cfg = GPTConfig.from_name("124M")
    hf, ours = pair(cfg, seed=0)
    hf.generation_config.eos_token_id = None  # both decode the full length: equal work, comparable tokens
    hf.generation_config.pad_token_id = 0
    hf16, ours16 = copy.deepcopy(hf).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    ours8 = quantize_model(copy.deepcopy(ours))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 10), generator=gen)
    long_prompt = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen)
    lengths = [4 + (3 * i) % 11 for i in range(args.batch)]
    batch, mask = left_pad([torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths])
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    text = torch.tensor([(enc.encode((ROOT / "README.md").read_text(), allowed_special="all") * 2)[:512]])
    ones = torch.ones_like

    cpu, flags = cpu_info()
    load = os.getloadavg()[0]
    t = Table(args.reps)
    fp32_bytes, bf16_bytes, int8_bytes = weight_bytes(ours), weight_bytes(ours16), weight_bytes(ours8)
    n, k, P, B, nb = args.new_tokens, args.beams, args.prefill, args.batch, args.beam_tokens
    # A prompt takes a fraction of a second: its rows get three times the runs, so that a burst of load on a
    # shared machine (here: seconds in which bf16 matmuls run at half speed) moves their medians less.
    short = 3 * args.reps

    def greedy(ref_model, model, idx=prompt, n=n, attn=None):
        attn = ones(idx) if attn is None else attn
        return (
            lambda: ref_model.generate(idx, attention_mask=attn, do_sample=False, max_new_tokens=n),
            lambda: generate(model, idx, n, attention_mask=None if bool(attn.all()) else attn),
        )

    base = {"base_fn": greedy(hf, ours)[1], "base_work": n}  # gpt2load fp32 batch 1, timed within the row
    old = {}  # the fp32 rows' base: gpt2load at --baseline, on the same weights
    if args.baseline:
        from bench_baseline import baseline_model

        pkg, old_model = baseline_model(args.baseline, ours)
        old = {
            "greedy": {"base_fn": lambda: pkg.generate(old_model, prompt, n), "base_work": n},
            "beam": {"base_fn": lambda: pkg.beam_search(old_model, prompt, nb, k, eos_id=None)[0], "base_work": nb},
            "prefill": {"base_fn": lambda: pkg.generate(old_model, long_prompt, 1), "base_work": P},
        }
    t.case(f"fp32 greedy, {n} new tokens", *greedy(hf, ours), n, "tok/s", fp32_bytes, n, **old.get("greedy", {}))
    t.case(
        f"fp32 beam search, {k} beams, {nb} new tokens",
        lambda: hf.generate(prompt, attention_mask=ones(prompt), do_sample=False, num_beams=k, max_new_tokens=nb),
        lambda: beam_search(ours, prompt, nb, k, eos_id=None).sequences,
        nb,
        "tok/s",
        fp32_bytes,
        nb,
        **old.get("beam", {}),
    )
    t.case(
        f"fp32 prefill, {P}-token prompt",
        *greedy(hf, ours, long_prompt, 1),
        P,
        "prompt tok/s",
        **old.get("prefill", {}),
        reps=short,
    )
    t.case(f"bf16 greedy, {n} new tokens", *greedy(hf16, ours16), n, "tok/s", bf16_bytes, n, **base)
    t.case(
        f"bf16 prefill, {P}-token prompt",
        *greedy(hf16, ours16, long_prompt, 1),
        P,
        "prompt tok/s",
        base_fn=greedy(hf, ours, long_prompt, 1)[1],  # vs gpt2load's fp32 prefill
        base_work=P,
        reps=short,
    )
    _, int8_out = t.case(
        f"int8 greedy, {n} new tokens (transformers: fp32)", *greedy(hf, ours8), n, "tok/s", int8_bytes, n, **base
    )
    fp32_out = generate(ours, prompt, n)
    t.rows[-1][4] = f"{(int8_out == fp32_out)[0, prompt.shape[1] :].float().mean().item():.0%} of fp32's"
    t.case(
        f"fp32 greedy, batch of {B} left-padded prompts, {n} new tokens each",
        *greedy(hf, ours, batch, n, mask),
        B * n,
        "tok/s",
        fp32_bytes,
        n,
        **base,
    )
    llama_rows: list = []
    if llama:
        with tempfile.TemporaryDirectory() as tmp:
            llama_rows += llama.rows("124M", {"fp32": ours, "bf16": ours16, "int8": ours8}, prompt, Path(tmp))
    for size in (s.strip() for s in args.sizes.split(",")):
        if size not in ("124M", ""):
            big = (lambda *a: llama_rows.extend(llama.big(*a))) if llama else None
            big_rows(t, size, args.big_tokens, args.big_tokens, k, big)
    top1, kl = fidelity(ours, ours8, text, entropy=3.0)
    top1_16, kl_16 = fidelity(ours, ours16, text, entropy=3.0)

    print(
        f"\ngpt2load vs transformers {transformers.__version__} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, 124M shape unless a row says otherwise, random weights, median of "
        f"{args.reps} alternating runs, {short} for the prefill rows; "
        f"1-minute load average before the run {load:.1f})\n"
    )
    print(f"CPU: {cpu}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    bws = sorted(t.bandwidths)
    print(
        f"Memory bandwidth (memcpy of 500 MB, read + write, timed in each row): {bws[0] / 1e9:.1f} to "
        f"{bws[-1] / 1e9:.1f} GB/s\n"
    )
    t.print()
    print(
        f"\nWeights read per decoding step: fp32 {fp32_bytes / 1e6:.0f} MB, bf16 {bf16_bytes / 1e6:.0f} MB, int8 "
        f"{int8_bytes / 1e6:.0f} MB. 'vs base' is timed in the same row (tokens/s over tokens/s): for bf16, int8 and "
        "batch rows the base is gpt2load's fp32 batch-1 greedy (for bf16 prefill, its fp32 prefill)"
        + (f"; for the 124M fp32 rows, gpt2load at {args.baseline} on the same weights." if args.baseline else ".")
    )
    print(
        f"Fidelity to fp32, teacher-forced on {text.shape[1]} tokens of README.md: int8 top-1 agreement "
        f"{top1:.1%}, mean KL(fp32 || int8) {kl:.4f} nats; bf16 {top1_16:.1%}, {kl_16:.4f} nats "
        "(random weights; both logits divided by the temperature giving fp32 a 3-nat mean entropy, as trained GPT-2)."
    )
    held, fp32_all = held_bytes(ours8), held_bytes(ours)
    with tempfile.TemporaryDirectory() as tmp:
        rss8, rss32 = resident_bytes(ours8, Path(tmp) / "int8"), resident_bytes(ours, Path(tmp) / "fp32")
        rss8q = resident_bytes(ours, Path(tmp) / "fp32", "int8")
    print(
        f"int8 weights held: {held / 1e6:.0f} MB = {held / fp32_all:.2f}x fp32's {fp32_all / 1e6:.0f} MB (the tied "
        "head and the token embedding share one int8 matrix). Resident-memory growth of a fresh process: "
        f"quantizing the fp32 file on loading, {rss8q[0] / 1e6:.0f} MB once loaded = {rss8q[0] / fp32_all:.2f}x fp32's "
        f"weights; after decoding 5 tokens (decoding's own buffers added, the same in each): fp32 "
        f"{rss32[1] / 1e6:.0f} MB, int8 from its saved form {rss8[1] / 1e6:.0f} MB = {rss8[1] / rss32[1]:.2f}x, "
        f"int8 quantized on loading {rss8q[1] / 1e6:.0f} MB = {rss8q[1] / rss32[1]:.2f}x."
    )
    if llama:
        llama.print(llama_rows)
    if args.profile:
        profile_decoding(ours, prompt, 50)
    return 0


if __name__ == "__main__":
    sys.exit(main())
