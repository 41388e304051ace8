"""llama.cpp columns of `bench.py generate`: gpt2load against llama-cpp-python on the same weights, side by side.

gpt2load writes the GGUF files (f32, f16, bf16, q8_0) with its own converter; when llama.cpp's converter is found
(`--llama-src DIR`, an unpacked llama-cpp-python sdist's vendor/llama.cpp), the same weights also go through it
(from a transformers folder written by gpt2load's hf exporter), so the table shows whether our files give
llama.cpp the same tokens and logits as its own, and how fast llama.cpp runs on each. Greedy decoding, batch 1,
the engines alternating round by round with the same thread count; both include the prompt's prefill.

llama.cpp must be built for the CPU it runs on (pip's default, GGML_NATIVE=ON): a portable build leaves out
AVX-512 and friends, is slower, and would flatter gpt2load. The build's instruction sets (from
llama_print_system_info) are compared with /proc/cpuinfo and a portable build is flagged in the table's header
(`--require-native-llama` makes it an error). To show a portable (AVX2-only) build beside a native one on an
AVX-512 machine, run the bench again with LLAMA_CPP_LIB_PATH=DIR naming that build's llama_cpp/lib folder
(llama-cpp-python loads its libraries from there): its rows are marked (portable).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

# ggml's name for an instruction set (as llama_print_system_info lists it) -> the /proc/cpuinfo flags meaning it
FEATURES = {
    "AVX2": ("avx2",),
    "AVX512": ("avx512f",),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AVX_VNNI": ("avx_vnni",),
    "AMX_INT8": ("amx_int8",),
}
# the table's rows: (gpt2load precision, llama.cpp file type)
ROWS = (("fp32", "f32"), ("bf16", "f16"), ("bf16", "bf16"), ("int8", "q8_0"))
ROWS_TYPES = tuple(t for _, t in ROWS)
# the CPU flags the table's header names (README: "the CPU flags of the machine it ran on")
CPU_FLAGS = {"AVX2": ("avx2",), "AVX-512": ("avx512f",), "AVX512-BF16": ("avx512_bf16",), "AMX": ("amx_tile",)}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def build_features() -> dict[str, str]:
    """The features llama.cpp's CPU backend was built with, as `llama_print_system_info` lists them."""
    import llama_cpp

    text = llama_cpp.llama_print_system_info().decode(errors="replace")
    pairs = (part.split("=", 1) for part in text.replace("CPU :", "|").split("|") if "=" in part)
    return {k.strip(): v.strip() for k, v in pairs}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))


def missing_features() -> list[str]:
    """Instruction sets this CPU has that the llama.cpp build does not use: non-empty for a portable build."""
    built, flags = build_features(), cpu_flags()
    return [k for k, names in FEATURES.items() if any(f in flags for f in names) and built.get(k, "0") == "0"]


def native_report() -> tuple[str, bool]:
    """One line on llama.cpp's build against this CPU, and whether it is native (nothing left out)."""
    built, missing = build_features(), missing_features()
    used = ", ".join(k for k in FEATURES if built.get(k, "0") != "0") or "none of " + ", ".join(FEATURES)
    if not missing:
        return f"llama.cpp build uses {used}: native for this CPU.", True
    return (
        f"WARNING: llama.cpp was built without {', '.join(missing)} which this CPU has: a portable build, slower "
        "than what a user installing it gets; rebuild with `pip install --no-binary llama-cpp-python --no-cache-dir "
        "--force-reinstall llama-cpp-python==0.3.36` (GGML_NATIVE=ON) for a fair comparison",
        False,
    )


class LlamaGreedy:
    """One GGUF file in llama.cpp: greedy decoding by its low-level eval and an argmax over the last logits (the
    sampler chain of Llama.generate would add work gpt2load does not do, and Llama.generate skips the prefill of
    a prompt it has seen)."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """The logits after the prompt (a copy), from an empty cache."""
        self.llm.reset()
        self.llm.eval(prompt)
        return self.last_logits().copy()

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """The prompt and `n` greedy tokens, the prompt's prefill included, as gpt2load's generate returns."""
        self.llm.reset()
        self.llm.eval(prompt)
        out = list(prompt)
        for i in range(n):
            out.append(int(np.argmax(self.last_logits())))
            if i < n - 1:
                self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()


def converter_ggufs(model, src: Path | None, folder: Path, tokenizer_dir: Path, types: list[str]) -> dict[str, object]:
    """GGUF files of `model` in each of `types` by llama.cpp's own convert_hf_to_gguf.py (its gguf-py, run with
    this Python), from a transformers folder gpt2load writes: {type: path, or the reason there is none}."""
    if src is None or not (src / "convert_hf_to_gguf.py").is_file():
        why = "no --llama-src" if src is None else f"no convert_hf_to_gguf.py in {src}"
        return dict.fromkeys(types, f"llama.cpp's converter not available ({why})")
    from gpt2load.formats.exports import export_hf

    hf_dir = folder / "hf"
    export_hf(model, hf_dir, tokenizer_dir, force=True)
    out: dict[str, object] = {}
    for t in types:
        path = folder / f"llama-{t}.gguf"
        cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", t, "--outfile", str(path)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode or not path.is_file():
            last = (run.stderr.strip().splitlines() or ["no output"])[-1]
            out[t] = f"llama.cpp's converter failed for {t}: {last}"
        else:
            out[t] = path
    return out


def _interleaved(fns: list, reps: int) -> tuple[list[float], list]:
    """Median seconds of each function: a warm-up each, then `reps` rounds calling each in turn."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], outs


def _share(tokens: list[int], ref: list[int], start: int) -> float:
    new, want = tokens[start:], ref[start:]
    return sum(a == b for a, b in zip(new, want, strict=True)) / len(want)


def llama_rows(
    size: str,
    models: dict[str, torch.nn.Module],
    prompt: torch.Tensor,
    n: int,
    reps: int,
    folder: Path,
    tokenizer_dir: Path,
    llama_src: Path | None,
    types: tuple[str, ...] = ROWS_TYPES,
    portable: bool = False,
) -> list[list[str]]:
    """The table's rows at `size`: for each (precision, file type) in ROWS whose type is in `types`, gpt2load at
    that precision (`models`: fp32, bf16, int8) against llama.cpp on gpt2load's GGUF and on llama.cpp's
    converter's GGUF, timed alternating, and the share of each one's new tokens equal to gpt2load fp32's."""
    from gpt2load import generate
    from gpt2load.formats.gguf import export_gguf

    threads = torch.get_num_threads()
    ids = prompt[0].tolist()
    start, n_ctx = len(ids), len(ids) + n + 8
    fp32_tokens = generate(models["fp32"], prompt, n)[0].tolist()
    with torch.no_grad():
        fp32_logits = models["fp32"](prompt)[0, -1].float().numpy()
    theirs = converter_ggufs(models["fp32"], llama_src, folder, tokenizer_dir, list(types))
    rows = []
    for prec, ftype in ROWS:
        if ftype not in types:
            continue
        ours_path = export_gguf(models["fp32"], folder / f"gpt2load-{ftype}.gguf", tokenizer_dir, ftype)
        ours_llama = LlamaGreedy(ours_path, threads, n_ctx)
        conv = theirs[ftype]
        conv_llama = LlamaGreedy(conv, threads, n_ctx) if isinstance(conv, Path) else None
        model = models[prec]
        fns = [lambda m=model: generate(m, prompt, n)[0].tolist(), partial(ours_llama.greedy, ids, n)]
        if conv_llama:
            fns.append(partial(conv_llama.greedy, ids, n))
        (t_ours, t_llama, *t_conv), (tok_ours, tok_llama, *tok_conv) = _interleaved(fns, reps)
        logits = ours_llama.prefill(ids)
        note = f" vs gpt2load fp32: max abs Δlogit {np.abs(logits - fp32_logits).max():.2g}" if ftype == "f32" else ""
        if conv_llama:
            delta = np.abs(conv_llama.prefill(ids) - logits).max()
            same = "same tokens" if tok_conv[0] == tok_llama else "DIFFERENT tokens"
            conv_cell = f"{n / t_conv[0]:.1f} tok/s"
            match = f"{same}, max abs Δlogit {delta:.2g}"
            conv_llama.close()
        else:
            conv_cell, match = "—", str(conv)
        ours_llama.close()
        case = f"{size} gpt2load {prec} vs llama.cpp {ftype}, greedy, {n} new tokens" + (" (portable)" * portable)
        same_row = "same tokens" if tok_ours == tok_llama else "different tokens"
        rows.append(
            [
                case,
                f"{n / t_ours:.1f} tok/s",
                f"{n / t_llama:.1f} tok/s",
                f"{t_llama / t_ours:.2f}x",
                conv_cell,
                match,
                f"{_share(tok_ours, fp32_tokens, start):.0%} / {_share(tok_llama, fp32_tokens, start):.0%} "
                f"({same_row}){note}",
            ]
        )
    return rows


HEADER = (
    "| case | gpt2load | llama.cpp (gpt2load's GGUF) | gpt2load / llama.cpp | llama.cpp (llama.cpp's converter) | "
    "llama.cpp's file vs gpt2load's (tokens, prompt logits) | tokens = gpt2load fp32's (ours / llama.cpp) |"
)


def print_table(rows: list[list[str]], reps: int, header_lines: list[str]) -> None:
    import llama_cpp

    print(
        f"\ngpt2load vs llama.cpp (llama-cpp-python {llama_cpp.__version__}, {torch.get_num_threads()} threads for "
        f"both, greedy, batch 1, 10-token prompt with its prefill in both, random weights, median of {reps} "
        "alternating runs after a warm-up)"
    )
    for line in header_lines:
        print(line)
    print()
    print(HEADER)
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def add_llama_options(p) -> None:
    """bench.py generate's options for the llama.cpp table."""
    p.add_argument(
        "--llama",
        action=argparse.BooleanOptionalAction,
        help="the llama.cpp table (default: on when llama_cpp imports)",
    )
    p.add_argument("--llama-tokens", type=int, default=128, help="llama.cpp table: greedy new tokens")
    p.add_argument(
        "--llama-src",
        type=Path,
        metavar="DIR",
        help="llama.cpp's source folder with convert_hf_to_gguf.py (an unpacked llama-cpp-python sdist's "
        "vendor/llama.cpp): also time and check llama.cpp on its own converter's files",
    )
    p.add_argument(
        "--require-native-llama",
        action="store_true",
        help="fail if llama.cpp was built without instruction sets this CPU has (a portable build)",
    )
    p.add_argument(
        "--llama-big-types",
        default="f16,bf16,q8_0",
        help="llama.cpp file types beyond 124M (f32 left out by default: gpt2load's, our GGUF's and the "
        "converter's 6 GB copies at once)",
    )


class LlamaBench:
    """The llama.cpp table's settings and the header lines it prints (build check, CPU flags)."""

    def __init__(self, args, tokenizer_dir: Path) -> None:
        self.args, self.tokenizer_dir, self.loads = args, tokenizer_dir, []
        self.build_line, self.native = native_report()
        flags = cpu_flags()
        have = {k: any(f in flags for f in v) for k, v in CPU_FLAGS.items()}
        self.cpu_line = "CPU flags: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in have.items())
        src = args.llama_src
        self.src_line = (
            f"llama.cpp's converter: {src / 'convert_hf_to_gguf.py'}"
            if src and (src / "convert_hf_to_gguf.py").is_file()
            else "llama.cpp's converter not available"
            + (f" (no convert_hf_to_gguf.py in {src})" if src else " (pass --llama-src DIR)")
            + ": its columns are left empty"
        )

    def rows(self, size: str, models: dict, prompt: torch.Tensor, folder: Path, big: bool = False) -> list:
        self.loads.append(f"{size} {os.getloadavg()[0]:.1f}")
        types = tuple(t.strip() for t in self.args.llama_big_types.split(",")) if big else ROWS_TYPES
        a = self.args
        return llama_rows(
            size,
            models,
            prompt,
            a.llama_tokens,
            a.reps,
            folder,
            self.tokenizer_dir,
            a.llama_src,
            types,
            portable=not self.native,
        )

    def big(self, size: str, fp32, prompt: torch.Tensor, folder: Path) -> list:
        """Rows beyond 124M: bf16 and int8 made from the model's folder on loading, not from `fp32` (no second
        float32 copy in memory)."""
        from gpt2load import load_gpt2

        models = {
            "fp32": fp32,
            "bf16": load_gpt2(folder, device="cpu", dtype=torch.bfloat16, quiet=True),
            "int8": load_gpt2(folder, device="cpu", quantize="int8", quiet=True),
        }
        return self.rows(size, models, prompt, folder, big=True)

    def print(self, rows: list) -> None:
        lib = os.environ.get("LLAMA_CPP_LIB_PATH")
        lines = [self.build_line + ("" if self.native else ". Rows marked (portable).")]
        lines += [f"llama.cpp's libraries from LLAMA_CPP_LIB_PATH={lib}"] if lib else []
        # a busy machine can slow llama.cpp's rows far more than gpt2load's (its threads meet after every op)
        load = "1-minute load average before the rows: " + ", ".join(self.loads)
        print_table(rows, self.args.reps, [*lines, self.cpu_line, self.src_line, load])


def llama_bench(args, tokenizer_dir: Path) -> tuple[LlamaBench | None, str]:
    """The llama.cpp table's runner, or None when it is off; and an error line (--require-native-llama on a
    portable build, --llama without llama_cpp)."""
    on = available() if args.llama is None else args.llama
    if not on:
        return None, ""
    if not available():
        return None, "--llama: llama_cpp does not import: pip install -e '.[gguf-check]'"
    bench = LlamaBench(args, tokenizer_dir)
    if args.require_native_llama and not bench.native:
        return None, "--require-native-llama: " + bench.build_line.removeprefix("WARNING: ")
    return bench, ""
