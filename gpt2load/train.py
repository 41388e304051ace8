"""Continued pretraining: the loop (AdamW, warmup + cosine, clipping, bf16 autocast), evaluation, metrics,
checkpoints that resume bit-exactly, layer freezing and multi-process data parallel (torchrun + DDP).

`train` runs the loop on any DataLoaders yielding (input, target) batches; `train_on_files` is what
`gpt2load train` calls: load a model, tokenize text files into windows, train, save the final model.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    latest_checkpoint,
    list_checkpoints,
    prune,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .errors import Gpt2LoadError
from .lora import DEFAULT_ALPHA, DEFAULT_TARGETS, check_lora_settings, parse_targets, setup_lora
from .model import GPTModel, is_derived, stored_state
from .stfile import atomic_path

# ---------------------------------------------------------------- processes (torchrun)


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA, one GPU per
    local rank. Returns (rank, world_size, device); a single process gets (0, 1, the chosen device)."""
    from .build import pick_device

    dev = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, dev
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise Gpt2LoadError(f"multi-process training runs on cpu or cuda, not {dev.type}: pass --device cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def _rank0_first(fn: Callable[[], object]) -> object:
    """Run fn on rank 0 first (e.g. writing a cache), then on the other ranks; an error on rank 0 is raised
    on every rank instead of leaving the others waiting."""
    rank, world = dist_info()
    if world == 1:
        return fn()
    import torch.distributed as dist

    result, failure = None, [None]
    if rank == 0:
        try:
            result = fn()
        except BaseException as e:
            failure = [str(e) if isinstance(e, Gpt2LoadError) else f"rank 0 failed: {type(e).__name__}: {e}"]
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise Gpt2LoadError(failure[0])
    return fn() if rank != 0 else result


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    rank, world = dist_info()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------- what trains, and how fast


def parse_train_layers(spec: str, n_layers: int) -> int | None:
    """None for 'all', N for 'last:N' (checked against the model's block count)."""
    if spec == "all":
        return None
    m = re.fullmatch(r"last:(\d+)", spec)
    if not m:
        raise Gpt2LoadError(f"--train-layers {spec!r} is not understood: use all or last:N")
    n = int(m.group(1))
    if not 1 <= n <= n_layers:
        raise Gpt2LoadError(f"--train-layers {spec}: the model has {n_layers} blocks, so use last:1 to last:{n_layers}")
    return n


def apply_freezing(model: GPTModel, spec: str = "all") -> list[nn.Parameter]:
    """Set requires_grad for `spec` and return the trainable parameters (each once).

    'all' trains everything. 'last:N' trains the last N transformer blocks and the final LayerNorm, as the
    book's chapter 6 does, and freezes the embeddings: the output head is the token embedding's Parameter
    here, so it stays frozen too (chapter 6 replaces the head with a new one; continued pretraining keeps
    GPT-2's tied head, and training it would also move every input embedding).
    """
    n = parse_train_layers(spec, model.cfg.n_layers)
    for p in model.parameters():
        p.requires_grad_(n is None)
    if n is not None:
        untied = [model.out_head] if model.out_head.weight is not model.tok_emb.weight else []
        for module in [*model.trf_blocks[-n:], model.final_norm, *untied]:  # a new head always learns
            for p in module.parameters():
                p.requires_grad_(True)
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def make_optimizer(model: GPTModel, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices of the blocks only: not on biases, LayerNorms or embeddings
    (the tied head is the token embedding's Parameter, so it lands once, in the no-decay group)."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = model.tok_emb.weight.device
    fused = device.type in ("cpu", "cuda")  # one kernel per step instead of a Python loop over parameters
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


class WarmupCosine:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at `total` steps.

    Its state is only the step count, so a resumed run may change the schedule's settings (with a warning).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int) -> None:
        self.optimizer, self.lr, self.min_lr, self.warmup, self.total = optimizer, lr, min_lr, warmup, total
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    @property
    def current(self) -> float:
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.current

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


# ---------------------------------------------------------------- evaluation and samples


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's next-token predictions (logits upcast to float32)."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: GPTModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp_dtype: torch.dtype = torch.float32,
) -> float | None:
    """Mean per-token loss over `batches` (summed over every rank's share); None when there are none."""
    device = model.tok_emb.weight.device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp_dtype):
            loss = batch_loss(model, x, y, reduction="sum")
        total += torch.tensor([loss.item(), y.numel()], dtype=torch.float64)
    model.train(was_training)
    _all_sum(total)
    return float(total[0] / total[1]) if total[1] else None


def _eval_batches(loader, n: int):
    if hasattr(loader, "fixed_batches"):
        return loader.fixed_batches(n)
    return islice(iter(loader), n)


@torch.no_grad()
def sample_text(model: GPTModel, enc, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt` (stops at <|endoftext|>), for a glance at what the model learned."""
    from .generate import generate
    from .tokenizer import EOT_ID, encode

    ids = encode(enc, prompt) or [EOT_ID]
    idx = torch.tensor([ids[-model.cfg.context_length :]], device=model.tok_emb.weight.device)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, model.cfg.context_length, temperature=0.0, eos_id=EOT_ID)
    model.train(was_training)
    return enc.decode(out[0, idx.shape[1] :].tolist())


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 700.0))


# ---------------------------------------------------------------- metrics.jsonl and loss.png


class MetricsLog:
    """metrics.jsonl: one JSON object per evaluation, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict]:
        rows = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return rows
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut off by a kill, and anything after it
        return rows

    def truncate(self, last_step: int) -> list[dict]:
        """Drop the rows after `last_step` (written after the checkpoint being resumed)."""
        keep = [r for r in self.rows() if r.get("step", -1) <= last_step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        return keep

    def append(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def plot_losses(rows: Sequence[dict], path: Path) -> bool:
    """Write train/validation loss against tokens seen as a PNG; False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        pts = [(r["tokens_seen"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return True


# ---------------------------------------------------------------- the loop


def _check_positive(**values) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, int) or v < 1):
            raise Gpt2LoadError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


def _check_options(**values) -> None:
    for name, v in values.items():
        if v is not None and (not isinstance(v, int | float) or v < 0 or not math.isfinite(v)):
            raise Gpt2LoadError(f"--{name.replace('_', '-')} must be a number of at least 0, got {v!r}")


def _total_steps(max_steps: int | None, epochs: int | None, loader, grad_accum: int) -> int:
    if max_steps is not None:
        return max_steps
    try:
        per_epoch = len(loader)
    except TypeError:
        raise Gpt2LoadError("the training loader has no length: give max_steps instead of epochs") from None
    total = (epochs or 1) * per_epoch // grad_accum
    if total < 1:
        raise Gpt2LoadError(
            f"{epochs or 1} epoch(s) of {per_epoch} batches make no step of --grad-accum {grad_accum} batches: "
            "lower --grad-accum or --batch-size, or give --max-steps"
        )
    return total


def _open_epoch(loader, epoch: int, start: int) -> Iterator:
    if hasattr(loader, "iter_epoch"):
        return loader.iter_epoch(epoch, start)
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
    it = iter(loader)
    for _ in range(start):
        next(it)  # re-reads the batches already seen this epoch: exact when the order is reproducible
    return it


def _unwrap(model: nn.Module) -> GPTModel:
    return getattr(model, "module", model)


class _BatchStream:
    """The training batches as one stream across epochs, at a position (epoch, batches read) that checkpoints
    save. For loaders without `iter_epoch`, the torch RNG state just before each epoch's `iter()` is kept too,
    so that a shuffling DataLoader draws the same order again when a run resumes mid-epoch."""

    def __init__(self, loader, epoch: int = 0, position: int = 0, epoch_rng: torch.Tensor | None = None) -> None:
        self.loader, self.epoch, self.position, self.epoch_rng = loader, epoch, position, epoch_rng
        self._resuming = position > 0 or epoch_rng is not None
        self._it: Iterator | None = None

    def _open(self) -> None:
        if self._resuming:
            now = rng_state(None)
            if self.epoch_rng is not None:
                torch.set_rng_state(self.epoch_rng.cpu())
            self._it = _open_epoch(self.loader, self.epoch, self.position)
            set_rng_state(now)
            self._resuming = False
        else:
            self.epoch_rng = torch.get_rng_state()
            self._it = _open_epoch(self.loader, self.epoch, self.position)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                if self.position == 0:
                    raise Gpt2LoadError("the training loader yielded no batches") from None
                self.epoch, self.position, self._it = self.epoch + 1, 0, None
                continue
            self.position += 1
            return batch


def _train_step(net, base: GPTModel, batches: _BatchStream, grad_accum: int, amp_dtype: torch.dtype, world: int):
    """Forward and backward over grad_accum batches; returns (mean loss on this rank, tokens on all ranks)."""
    device = base.tok_emb.weight.device
    step_loss, tokens = 0.0, 0
    for k in range(grad_accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync = k == grad_accum - 1 or net is base
        with nullcontext() if sync else net.no_sync():
            with _autocast(device, amp_dtype):
                loss = batch_loss(net, x, y)
            # each rank's loss is a mean over its own equal-sized batch and DDP averages the gradients, so
            # the step follows the mean over the global batch; dividing by grad_accum does the same in time
            (loss / grad_accum).backward()
        step_loss += loss.item() / grad_accum
        tokens += x.numel() * world
    return step_loss, tokens


def _find_resume_checkpoint(ck_dir: Path, device: torch.device, warn) -> tuple[Path, dict] | None:
    """Rank 0 picks the newest valid checkpoint (setting damaged ones aside); every rank loads that one."""
    rank, world = dist_info()
    found = _rank0_first(lambda: latest_checkpoint(ck_dir, device, warn) if rank == 0 else None)
    if world > 1:
        import torch.distributed as dist

        chosen = [str(found[0]) if found else None]
        dist.broadcast_object_list(chosen, src=0)
        if rank != 0 and chosen[0] is not None:
            found = (Path(chosen[0]), torch.load(chosen[0], map_location=device, weights_only=True))
    return found


def _restore(path: Path, ck: dict, base: GPTModel, optimizer, schedule, train_layers: str) -> None:
    tied = base.out_head.weight is base.tok_emb.weight
    missing, unexpected = base.load_state_dict(ck["model"], strict=False)
    missing = [k for k in missing if not (is_derived(k) and (tied or k != "out_head.weight"))]
    if missing or unexpected:
        raise Gpt2LoadError(f"{path} does not fit this model (it differs in {(missing + unexpected)[:3]})")
    if tied:
        base.tie_weights()
    try:
        optimizer.load_state_dict(ck["optimizer"])
    except ValueError:
        raise Gpt2LoadError(
            f"{path} was trained with other --train-layers than {train_layers!r}: resume with the same value"
        ) from None
    schedule.load_state_dict(ck["scheduler"])


def train(
    model: GPTModel,
    train_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    val_loader: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    *,
    max_steps: int | None = None,
    epochs: int | None = None,
    grad_accum: int = 1,
    lr: float = 1e-4,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    dtype: str | torch.dtype = "float32",
    train_layers: str = "all",
    eval_every: int = 100,
    eval_batches: int = 10,
    save_every: int | None = 500,
    keep_checkpoints: int = 3,
    out_dir: str | Path | None = None,
    resume: bool = False,
    seed: int = 123,
    tokenizer=None,
    sample_prompt: str | None = None,
    sample_tokens: int = 40,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    run_info: dict | None = None,
    metrics_fn: Callable[[nn.Module], dict] | None = None,
) -> list[dict]:
    """Train `model` in place on batches of (input ids, target ids) and return the metric rows.

    Args:
        model: a float32 GPTModel on its device (under torchrun it is wrapped in DDP here).
        train_loader: yields (input, target) int64 [B, T]; `len()` is needed only for `epochs`. Each epoch it
            is opened anew (`set_epoch(epoch)` is called on it or its sampler when present).
        val_loader: the same for validation, or None.
        max_steps: optimizer steps to run (else `epochs` passes over train_loader, default 1).
        grad_accum: batches per optimizer step.
        lr, min_lr: peak learning rate and the floor of the cosine decay (default lr / 10).
        warmup_steps: linear warmup steps (default 5% of the run).
        weight_decay: AdamW weight decay, applied to block matrices only.
        grad_clip: clip the global gradient norm to this (None or 0: no clipping).
        dtype: "float32", or "bfloat16" for bf16 autocast (the weights stay float32).
        train_layers: "all" or "last:N" (last N blocks + final LayerNorm; embeddings and tied head frozen).
        eval_every: evaluate (and log a metrics row) every this many steps and at the end; 0 = only at the end.
        eval_batches: batches of each loader to evaluate on.
        save_every: checkpoint every this many steps and at the end (needs out_dir; None/0 = only at the end).
        keep_checkpoints: how many checkpoints to keep.
        out_dir: where metrics.jsonl, loss.png and checkpoints/ go (rank 0 only); None writes nothing.
        resume: continue from the newest valid checkpoint in out_dir/checkpoints (from scratch if none).
        seed: seeds torch, random and numpy (plus the rank, under torchrun).
        tokenizer, sample_prompt, sample_tokens: print a greedy sample of this prompt at every evaluation.
        progress: a tqdm bar (default: only when stderr is a terminal).
        log: where progress lines go (default print on rank 0).
        run_info: extra settings stored in checkpoints and compared on resume (e.g. the data and batch size).
        metrics_fn: called with the model at every evaluation; its dict joins the metrics row (e.g. accuracies).
    """
    from .build import pick_dtype

    rank, world = dist_info()
    base = _unwrap(model)
    _check_positive(
        max_steps=max_steps,
        epochs=epochs,
        grad_accum=grad_accum,
        eval_batches=eval_batches,
        keep_checkpoints=keep_checkpoints,
    )
    _check_options(
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        eval_every=eval_every,
        save_every=save_every,
        sample_tokens=sample_tokens,
    )
    amp_dtype = pick_dtype(dtype)
    if amp_dtype not in (torch.float32, torch.bfloat16):
        raise Gpt2LoadError(f"--dtype {dtype} is not supported for training: use float32 or bfloat16")
    if any(p.dtype != torch.float32 for p in base.parameters()):
        raise Gpt2LoadError("train needs a float32 model; pass dtype='bfloat16' for bf16 autocast instead")
    if resume and out_dir is None:
        raise Gpt2LoadError("resume needs out_dir, where the checkpoints are")
    device = base.tok_emb.weight.device
    log = log or (print if rank == 0 else (lambda msg: None))

    def warn(msg: str) -> None:
        if rank == 0:
            print(f"gpt2load: warning: {msg}", file=sys.stderr, flush=True)

    if train_layers is None:  # the caller chose (e.g. LoRA adapters and a new head)
        trainable = list({id(p): p for p in base.parameters() if p.requires_grad}.values())
    else:
        trainable = apply_freezing(base, train_layers)
    total = _total_steps(max_steps, epochs, train_loader, grad_accum)
    warmup = round(0.05 * total) if warmup_steps is None else warmup_steps
    min_lr = lr / 10 if min_lr is None else min_lr
    settings = {
        "total_steps": total,
        "grad_accum": grad_accum,
        "lr": lr,
        "min_lr": min_lr,
        "warmup_steps": warmup,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "dtype": str(amp_dtype).removeprefix("torch."),
        "train_layers": train_layers,
        "seed": seed,
        "world_size": world,
        **(run_info or {}),
    }
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    optimizer = make_optimizer(base, lr, weight_decay)
    schedule = WarmupCosine(optimizer, lr, min_lr, warmup, total)

    # ------------------------------------------------ the run folder, and where to start
    out = Path(out_dir) if out_dir is not None else None
    ck_dir = out / "checkpoints" if out else None
    metrics = MetricsLog(out / "metrics.jsonl") if out else None
    step, tokens_seen, batches = 0, 0, _BatchStream(train_loader)
    rows: list[dict] = []
    if out:
        if not resume and (list_checkpoints(ck_dir) or metrics.rows()):
            raise Gpt2LoadError(f"{out} already holds a training run: pass --resume to continue it, or another --out")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            for tmp in ck_dir.glob(".step-*.tmp") if ck_dir.is_dir() else []:
                tmp.unlink(missing_ok=True)  # left by a run killed while writing
    if resume:
        found = _find_resume_checkpoint(ck_dir, device, warn)
        if found is None:
            log("gpt2load: no checkpoint to resume from; starting at step 0")
        else:
            path, ck = found
            _restore(path, ck, base, optimizer, schedule, train_layers)
            step, tokens_seen = ck["step"], ck["tokens_seen"]
            changed = [f"{k} {ck['settings'].get(k)} -> {v}" for k, v in settings.items() if ck["settings"].get(k) != v]
            if changed:
                warn(f"resuming with changed settings ({', '.join(changed)}): results will differ from one run")
            if len(ck["rng"]) == world:
                set_rng_state(ck["rng"][rank])
                epoch_rng = ck["rng"][rank]["epoch_rng"]
            else:
                warn(f"the checkpoint has RNG states for {len(ck['rng'])} processes, this run has {world}")
                epoch_rng = None
            batches = _BatchStream(train_loader, ck["data"]["epoch"], ck["data"]["position"], epoch_rng)
            log(f"gpt2load: resuming from {path} (step {step}/{total})")
        if rank == 0:
            rows = metrics.truncate(step if found else -1)  # rows after the checkpoint are written again

    net = model
    if world > 1 and net is base:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(base, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    # ------------------------------------------------ metrics rows and checkpoints
    timer = {"train_s": 0.0, "tokens": 0}
    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="training")
    say = bar.write if bar else log

    def record() -> None:
        with torch.random.fork_rng(devices=[]):  # opening a shuffling loader draws from the training RNG
            train_loss = evaluate(base, _eval_batches(train_loader, eval_batches), amp_dtype)
            val_loss = evaluate(base, _eval_batches(val_loader, eval_batches), amp_dtype) if val_loader else None
            extra = metrics_fn(base) if metrics_fn else {}
        tps = timer["tokens"] / timer["train_s"] if timer["train_s"] > 0 else None
        timer.update(train_s=0.0, tokens=0)
        row = {
            "step": step,
            "epoch": batches.epoch,
            "tokens_seen": tokens_seen,
            "lr": schedule.lr_at(max(step - 1, 0)),  # the rate of the step just taken
            "train_loss": train_loss,
            "train_ppl": _ppl(train_loss),
            "val_loss": val_loss,
            "val_ppl": _ppl(val_loss),
            "tokens_per_s": tps,
            **extra,
        }
        rows.append(row)
        if rank != 0:
            return
        if metrics:
            metrics.append(row)
        val = f"  val {val_loss:.4f} (ppl {_ppl(val_loss):.2f})" if val_loss is not None else ""
        speed = f"  {tps:,.0f} tok/s" if tps else ""
        say(f"step {step}/{total}  tokens {tokens_seen:,}  train {train_loss:.4f}{val}{speed}")
        if sample_prompt is not None and tokenizer is not None:
            text = sample_text(base, tokenizer, sample_prompt, sample_tokens).replace("\n", " ")
            say(f"sample: {sample_prompt}{text}")

    def checkpoint() -> None:
        states = [rng_state(batches.epoch_rng)]
        if world > 1:  # every rank's RNG (dropout differs per rank); only rank 0 writes
            import torch.distributed as dist

            mine, states = states[0], [None] * world
            dist.all_gather_object(states, mine)
        if rank != 0:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": step,
            "tokens_seen": tokens_seen,
            "model": stored_state(base),
            "config": base.cfg.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "data": {"epoch": batches.epoch, "position": batches.position, "shuffle_seed": seed},
            "rng": states,
            "settings": settings,
        }
        save_checkpoint(ck_dir / f"step-{step:06d}.pt", payload)
        prune(ck_dir, keep_checkpoints)

    # ------------------------------------------------ the loop
    if step == 0 and eval_every:
        record()
    base.train()
    while step < total:
        t0 = time.perf_counter()
        step_loss, tokens = _train_step(net, base, batches, grad_accum, amp_dtype, world)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens
        timer["tokens"] += tokens
        timer["train_s"] += time.perf_counter() - t0
        if bar:
            tps = timer["tokens"] / timer["train_s"] if timer["train_s"] else 0.0
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update(1)
        if (eval_every and step % eval_every == 0) or step == total:
            record()
        if out and ((save_every and step % save_every == 0) or step == total):
            checkpoint()
    if bar:
        bar.close()
    base.eval()
    if out and rank == 0 and not plot_losses(rows, out / "loss.png"):
        log("gpt2load: matplotlib is not installed, so no loss.png (pip install 'gpt2load[plot]')")
    return rows


# ---------------------------------------------------------------- from text files (the CLI's entry point)


def train_on_files(
    model: str | Path,
    data: Sequence[str | Path],
    out: str | Path,
    *,
    val_data: Sequence[str | Path] | None = None,
    val_ratio: float = 0.1,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    dropout: float = 0.0,
    source: str = "hf",
    weights_dir: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | Path | None = None,
    quiet: bool = False,
    lora_rank: int | None = None,
    lora_alpha: float = DEFAULT_ALPHA,
    lora_targets: str | Sequence[str] = DEFAULT_TARGETS,
    merge: bool = True,
    **options,
) -> Path:
    """Continue pretraining `model` on text files and save the result in `out/final` (gpt2load's own form,
    loadable with `load_gpt2`, `gpt2load generate --model OUT/final` and `convert`). Run it under
    `torchrun --nproc_per_node N` for data parallel training: `batch_size` is per process.

    Args:
        model: a size or alias, or a local model folder/file (as for load_gpt2).
        data: text files or folders of .txt files (UTF-8), tokenized once into a cache.
        out: the run folder: metrics.jsonl, loss.png, checkpoints/, tokens/ (the cache), final/.
        val_data: separate validation files; else the last `val_ratio` of the tokens (0: no validation).
        context_length: window length (default the model's); stride: window step (default context_length).
        batch_size: windows per batch per process.
        dropout: the model's drop rate during training.
        source, weights_dir: where sizes are downloaded from / to.
        device: cpu, cuda, mps (default: the best available).
        cache_dir: where token caches go (default out/tokens).
        quiet: no download/tokenizing messages.
        lora_rank, lora_alpha, lora_targets: train LoRA adapters only (see lora.add_lora).
        merge: save the adapters merged into the model (False: beside it, see export.save_finetuned).
        **options: passed to `train` (max_steps, epochs, grad_accum, lr, ..., resume, sample_prompt).
    """
    from .data import TokenWindows, WindowLoader, split_tokens, tokenize_files
    from .load import load_gpt2, load_tokenizer, model_folder

    _check_positive(batch_size=batch_size, context_length=context_length, stride=stride)
    if not 0.0 <= dropout < 1.0:
        raise Gpt2LoadError(f"--dropout must be at least 0 and below 1, got {dropout}")
    if not data:
        raise Gpt2LoadError("no training data given: pass one or more text files or folders with --data")
    if val_data is None:
        split_tokens(np.zeros(0, np.uint16), val_ratio)  # checks the ratio before anything slow
    if lora_rank is not None:
        check_lora_settings(lora_rank, lora_alpha)
        parse_targets(lora_targets)
    rank, world, dev = init_distributed(device)
    try:
        out = Path(out)
        net = load_gpt2(model, source, weights_dir, device=dev, quiet=quiet or rank > 0)
        net.cfg = replace(net.cfg, drop_rate=dropout)
        for m in net.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        enc = load_tokenizer(model, source, weights_dir)
        length = context_length or net.cfg.context_length
        if length > net.cfg.context_length:
            raise Gpt2LoadError(
                f"--context-length {length} exceeds the model's context length {net.cfg.context_length}: lower it"
            )
        cache = Path(cache_dir) if cache_dir else out / "tokens"
        tokens = _rank0_first(lambda: tokenize_files(data, enc, cache, quiet=quiet)[0])
        if val_data:
            val_tokens = _rank0_first(lambda: tokenize_files(val_data, enc, cache, quiet=quiet)[0])
            train_tokens = tokens
        else:
            train_tokens, val_tokens = split_tokens(tokens, val_ratio)
        for what, t in (("the training data", train_tokens), ("the validation data", val_tokens)):
            if t is not None and len(t) and int(t.max()) >= net.cfg.vocab_size:
                raise Gpt2LoadError(
                    f"{what} has token id {int(t.max())}, beyond the model's vocabulary of {net.cfg.vocab_size}"
                )
        held_out = "" if val_data or val_tokens is None else f" (less the --val-ratio {val_ratio} held out)"
        train_w = TokenWindows(train_tokens, length, stride or length, f"the training data{held_out}")
        seed = options.get("seed", 123)
        train_loader = WindowLoader(train_w, batch_size, shuffle=True, seed=seed, rank=rank, world_size=world)
        if len(train_loader) == 0:
            raise Gpt2LoadError(
                f"the training data makes {len(train_w)} windows, fewer than one batch of {train_loader.global_batch}"
                f" (--batch-size {batch_size} x {world} processes): lower --batch-size or --stride, or add text"
            )
        val_loader = None
        if val_tokens is not None:
            if not val_data and len(val_tokens) < length + 1:
                raise Gpt2LoadError(
                    f"the validation split (--val-ratio {val_ratio}) has {len(val_tokens):,} tokens, fewer than "
                    f"one window of {length + 1}: raise --val-ratio, pass --val-data, or use --val-ratio 0"
                )
            val_w = TokenWindows(val_tokens, length, length, "the validation data")
            val_loader = WindowLoader(val_w, batch_size, shuffle=False, rank=rank, world_size=world)
        info = {"batch_size": batch_size, "context_length": length, "stride": stride or length, "dropout": dropout}
        info["train_tokens"], info["val_tokens"] = len(train_tokens), len(val_tokens) if val_tokens is not None else 0
        lora = setup_lora(net, lora_rank, lora_alpha, lora_targets, seed)
        if lora is not None:
            info["lora"] = lora
            options["train_layers"] = None  # the adapters alone train
        train(net, train_loader, val_loader, out_dir=out, tokenizer=enc, run_info=info, **options)
        final = out / "final"
        if rank == 0:
            from .export import save_finetuned

            where = model_folder(model, source, weights_dir, quiet=True)
            save_finetuned(net, final, where if where.is_dir() else where.parent, {}, merge)
            print(f"gpt2load: saved the trained model in {final}", flush=True)
        return final
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


__all__ = [
    "WarmupCosine",
    "apply_freezing",
    "evaluate",
    "init_distributed",
    "latest_checkpoint",
    "make_optimizer",
    "plot_losses",
    "train",
    "train_on_files",
]
