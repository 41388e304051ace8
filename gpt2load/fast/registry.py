"""The speed layer's state in one explicit object: `Kernels` holds the settings it was built with and the kernel
chosen for each matmul and attention shape (forced by the settings, or measured once per shape and thread count,
and kept per machine by its `KernelStore`, if it has one, so a later process measures nothing).

Nothing here reads the environment: the settings come from `gpt2load.settings`, read at an entry point. A test
builds `Kernels(KernelSettings(matmul="split"))` for fixed choices and reads `kernels.linear_choices` to see
what ran, instead of clearing module caches. `shared_kernels(settings, store)` is the one instance per settings
and store that `load_gpt2` hands its models (with the machine's store), so a second model of the same shapes
does not measure again.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable

import torch

from ..errors import Gpt2LoadError
from ..settings import KernelSettings
from . import attn, int8mm, native
from .kernels import (
    KERNELS,
    _native,
    _onednn,
    _plain,
    _split,
    fastest,
    onednn_works,
    split_pieces,
)
from .kernelstore import KernelStore, StoredChoices

_FAST_DTYPES = (torch.float32, torch.bfloat16)
_COLD_BYTES = 48 << 20  # weights timed in turn until this much: more than the caches hold, as in decoding
_MAX_SHAPES = 4096  # memo entries before starting over (prompts of every length make new shapes)


def _rows_bucket(rows: int) -> int:
    """Calibration buckets of the number of rows a matmul sees (decoding, batches/beams, prompts)."""
    return 1 if rows <= 1 else 4 if rows <= 4 else 16 if rows <= 16 else 256 if rows <= 256 else 4096


class Kernels:
    """Which kernel computes each matmul and attention, for one set of `KernelSettings`.

    Attributes (the explicit state; read them in tests, never needed otherwise):
        linear_choices: the function `linear` calls, per call shape (weight/input shapes, dtypes, threads).
        measured: the kernel measured fastest, per shape bucket (shared by float and int8 matmuls).
        int8_choices: the function `int8_linear` calls, per call shape.
        attention_choices: the function `attention` calls, per shape bucket and layout.
        calibration_seconds, measurements: the time spent measuring and how many choices were measured (a choice
            found in the store costs neither).

    Args:
        settings: what may be used (default: everything, measured).
        store: where measured choices persist per machine (`kernelstore.machine_store(settings)`), or None to
            measure in every process. What was measured is written back when the process exits, or by `save()`.
    """

    def __init__(self, settings: KernelSettings | None = None, store: KernelStore | None = None) -> None:
        self.settings = settings or KernelSettings()
        self.store = store
        self.linear_choices: dict[tuple, Callable] = {}
        self.measured: dict[tuple, Callable] = {}
        self.int8_choices: dict[tuple, Callable] = {}
        self.attention_choices: dict[tuple, Callable] = {}
        self.calibration_seconds = 0.0
        self.measurements = 0
        self._stored = None if store is None else StoredChoices(store, self.settings)
        if self._stored is not None:  # at exit (or when this is collected): what was measured, written back
            weakref.finalize(self, self._stored.save)

    def __reduce__(self):  # a pickled model's Kernels comes back with its settings and store, to measure again
        return (Kernels, (self.settings, self.store))

    def save(self) -> None:
        """Write the choices measured so far to the store now (else done at exit)."""
        if self._stored is not None:
            self._stored.save()

    def _recall(self, key: tuple, candidates: tuple, agrees: Callable[[Callable], bool]) -> Callable | None:
        """The stored choice for `key`, if one of `candidates`; one other than the first only if it `agrees` with
        the reference on this input (else the first, and the entry is dropped); None: not stored, measure."""
        kernel = None if self._stored is None else self._stored.get(key)
        if kernel is None or kernel not in candidates:
            return None
        if kernel is candidates[0] or agrees(kernel):
            return kernel
        self._stored.put(key, None)
        return candidates[0]

    def _measured(self, key: tuple, kernel: Callable, start: float) -> Callable:
        self.calibration_seconds += time.perf_counter() - start
        self.measurements += 1
        if self._stored is not None:
            self._stored.put(key, kernel)
        return kernel

    def __deepcopy__(self, memo: dict) -> Kernels:  # copies of a model share their measurements
        return self

    # -- float matmuls ------------------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
        """`F.linear` (then tanh-GELU if asked) by the kernel chosen for x's device, dtype and shape.

        Decoding calls this about 50 times per token, so the choice is remembered per weight shape, input shape
        and thread count."""
        key = (w.shape, w.dtype, x.shape, x.dtype, x.is_cpu, b is None, gelu, w.is_contiguous())
        key += (torch.get_num_threads(),)
        fn = self.linear_choices.get(key)
        if fn is None:
            if len(self.linear_choices) > _MAX_SHAPES:
                self.linear_choices.clear()
            fn = self.linear_choices[key] = self._resolve(x, w, b, gelu)
        return fn(x, w, b, gelu)

    def _resolve(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> Callable:
        """The kernel `linear` uses for these operands (they are not kept: only their shapes and dtypes matter)."""
        dtype = x.dtype
        if dtype not in _FAST_DTYPES or w.dtype is not dtype or not x.is_cpu:
            return _plain
        mode, own = self.settings.matmul_mode, self.settings.native != "0"
        flat = x.reshape(-1, x.shape[-1])
        kernels = [_plain]
        if mode in ("auto", "onednn") and onednn_works(dtype):
            kernels.append(_onednn)
        if mode in ("auto", "no-onednn", "split") and flat.shape[0] <= 16 and w.is_contiguous():
            if split_pieces(w.shape[0], torch.get_num_threads()):
                kernels.append(_split)
        if own and mode in ("auto", "no-onednn", "native") and (native.usable(flat, w) or native.gemm_usable(flat, w)):
            kernels.append(_native)
        if mode == "native" and not native.available():  # (forced: float32 prompts still go to F.linear)
            why = native.why_unavailable()
            raise Gpt2LoadError(f"GPT2LOAD_MATMUL=native, but gpt2load's kernel is unavailable: {why}")
        if mode in KERNELS:  # forced: that kernel where it works, else F.linear
            kernel = KERNELS[mode] if KERNELS[mode] in kernels else _plain
        else:  # as one [rows, in] matrix: oneDNN may otherwise treat [B, 1, in] as B products that each read w
            kernel = self.calibrated(flat, w, b, gelu, tuple(kernels)) if len(kernels) > 1 else _plain
        if kernel is _plain or x.dim() == 2 or (kernel is _onednn and x.dim() == 3 and x.shape[0] == 1):
            return kernel
        return _flat(kernel)

    def calibrated(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None,
        gelu: bool,
        kernels: tuple,
        extra: tuple = (),
        ref: Callable | None = None,
    ) -> Callable:
        """The fastest of `kernels`, called `k(x, w, b, gelu, *extra)`, on this shape at this thread count, measured
        once; another kernel than the first only if it also agrees with `ref` (default: the first) on this input.

        Decoding reads every weight from memory at each step (a model does not fit in the caches), and which kernel
        streams a weight faster is not which one wins on a weight already in cache: for up to 16 rows, each kernel
        is timed over copies of the weight that together exceed the caches. With more rows the arithmetic
        dominates and the weight itself is timed."""
        rows = _rows_bucket(x.numel() // x.shape[-1])
        key = (kernels, x.dtype, rows, w.shape, b is None, gelu, torch.get_num_threads())
        kernel = self.measured.get(key)
        if kernel is None:
            reference = ref or kernels[0]
            kernel = self._recall(key, kernels, lambda k: bool(_agreeing((k,), reference, x, w, b, gelu, extra)))
            if kernel is None:
                start = time.perf_counter()
                kernel = self._measured(key, self._fastest(x, w, b, gelu, kernels, extra, reference, rows), start)
            self.measured[key] = kernel
        return kernel

    def _fastest(self, x, w, b, gelu, kernels: tuple, extra: tuple, reference: Callable, rows: int) -> Callable:
        kernel = kernels[0]
        try:
            agree = _agreeing(kernels[1:], reference, x, w, b, gelu, extra)
            if agree:
                size = w.numel() * w.element_size()
                weights = [w] + [w.clone() for _ in range(min(31, _COLD_BYTES // size) if rows <= 16 else 0)]
                reps = 3 if len(weights) > 1 else 4  # one weight: a single call per pass, closer to each other
                candidates = [kernel, *agree]
                fns = [lambda m, k=k: k(x, m, b, gelu, *extra) for k in candidates]
                kernel = candidates[fastest(fns, weights, reps)]
                del weights
        except RuntimeError:
            pass
        return kernel

    # -- int8 matmuls -------------------------------------------------------------------------------------------

    def int8_linear(
        self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        """x @ (q * scale[:, None]).T + b for int8 weights q [out, in] and per-output-channel scales [out].

        On CPU, for up to 16 rows, torch's int8 kernel and gpt2load's own are measured once per shape and the
        faster is used (matmul=native forces gpt2load's, any other forced kernel torch's; native=0 leaves torch's);
        more rows use torch's. int8pack=False, a torch without its kernel, or weights not 64-byte aligned
        (`int8mm.aligned_int8` makes them so) use gpt2load's kernel where it applies, else dequantize the weights
        and multiply in x's dtype (exact, slow)."""
        flat = x.reshape(-1, x.shape[-1])
        key = (q.shape, flat.shape, x.dtype, x.device, b is None, q.is_contiguous(), q.data_ptr() % 64 == 0)
        key += (torch.get_num_threads(),)
        kernel = self.int8_choices.get(key)
        if kernel is None:
            if len(self.int8_choices) > _MAX_SHAPES:
                self.int8_choices.clear()
            kernel = self.int8_choices[key] = self._choose_int8(flat, q, scale, b)
        return kernel(flat, q, b, False, scale).view(*x.shape[:-1], q.shape[0])

    def _choose_int8(self, flat: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None):
        s = self.settings
        # torch's kernel reads the weights with aligned vector loads for 4+ rows: misaligned memory would crash it.
        pack = (
            flat.device.type == "cpu"
            and q.is_contiguous()
            and q.data_ptr() % 64 == 0
            and q.shape[1] % 16 == 0  # (torch 2.13's kernel crashes on other widths: 40 and 72 segfault)
            and s.int8pack
            and int8mm.int8pack_works()
        )
        mode = s.matmul_mode
        own = s.native != "0" and mode in ("auto", "no-onednn", "native") and native.usable(flat, q)
        if own and pack and mode != "native":
            kernels = (int8mm.int8pack, int8mm.int8native)
            return self.calibrated(flat, q, b, False, kernels, (scale,), ref=int8mm.exact)
        return int8mm.int8native if own else int8mm.int8pack if pack else int8mm.exact

    # -- attention ----------------------------------------------------------------------------------------------

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of q [B, H, Tq, D] over k, v [B, H, Tk, D], query i seeing keys up to i + Tk - Tq, or where
        `mask` allows, without dropout: [B, Tq, H, D] (not necessarily contiguous). For inference: inputs that
        need gradients take torch's.

        torch's attention, or one of attend.c's kernels where it applies (bfloat16 without a mask; one float32
        query per row, decoding) and was measured faster for this shape bucket and layout (or is forced)."""
        if not q.is_cpu or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return attn.sdpa(q, k, v, mask)
        ours = attn.candidate(q, mask)
        setting = self.settings.attention
        if ours is None or setting == "sdpa" or self.settings.native == "0":
            return attn.sdpa(q, k, v, mask)
        key = (ours, attn.shape_key(q, k, v, mask), torch.get_num_threads())
        kernel = self.attention_choices.get(key)
        if kernel is None:
            if setting == "native":  # forced: nothing to measure
                kernel = attn.choose(ours, q, k, v, mask, forced=True)
            else:
                kernel = self._recall(key, (attn.sdpa, ours), lambda fn: _attention_agrees(fn, q, k, v, mask))
                if kernel is None:
                    start = time.perf_counter()
                    kernel = self._measured(key, attn.choose(ours, q, k, v, mask, forced=False), start)
            self.attention_choices[key] = kernel
        return kernel(q, k, v, mask)


def _agreeing(kernels: tuple, reference: Callable, x, w, b, gelu: bool, extra: tuple) -> list[Callable]:
    """Those of `kernels` whose product agrees with `reference`'s on this input (none if one of them fails)."""
    try:
        want = reference(x, w, b, gelu, *extra).float()
        tol = 1e-4 if x.dtype == torch.float32 else 5e-2
        return [k for k in kernels if torch.allclose(k(x, w, b, gelu, *extra).float(), want, atol=tol, rtol=tol)]
    except RuntimeError:
        return []


def _attention_agrees(kernel: Callable, q, k, v, mask) -> bool:
    """Whether attend.c's `kernel` takes these inputs and agrees with torch's (attn.choose's check, untimed)."""
    if not attn._usable(kernel, q, k, v, mask):
        return False
    try:
        tol = 3e-2 if q.dtype is torch.bfloat16 else 1e-4
        return torch.allclose(kernel(q, k, v, mask).float(), attn.sdpa(q, k, v, mask).float(), atol=tol, rtol=tol)
    except RuntimeError:
        return False


def _flat(kernel: Callable) -> Callable:
    """`kernel` on x of any rank, as one [rows, in] matrix."""

    def flattened(x, w, b, gelu):
        y = kernel(x.reshape(-1, x.shape[-1]), w, b, gelu)
        return y.view(*x.shape[:-1], y.shape[-1])

    flattened.kernel = kernel  # which kernel runs (for tests)
    return flattened


_shared: dict[tuple[KernelSettings, KernelStore | None], Kernels] = {}


def shared_kernels(settings: KernelSettings, store: KernelStore | None = None) -> Kernels:
    """The process's one `Kernels` for these settings and store (what `load_gpt2` hands its models, with the
    machine's store): measurements made for one model serve the next of the same shapes."""
    kernels = _shared.get((settings, store))
    if kernels is None:
        kernels = _shared[settings, store] = Kernels(settings, store)
    return kernels


__all__ = ["Kernels", "shared_kernels"]
