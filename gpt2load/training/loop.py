"""The training loop: AdamW with warmup + cosine, clipping, bf16 autocast, token-weighted losses, evaluation,
metrics, checkpoints that resume bit-exactly, and data parallel under torchrun (DDP, or FSDP: sharding.py).

`train(model, train_loader, val_loader, **options)` runs on any loaders yielding (input, target) batches; what
a batch's loss is comes from `TrainConfig.loss_fn` (next-token cross-entropy by default), so a recipe with
another objective (e.g. classification) plugs in without a second loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..errors import Gpt2LoadError
from ..fsutil import open_run_folder
from ..model.build import pick_dtype
from ..model.gpt import GPTModel, set_backend, stored_state
from ..model.quant import refuse_quantized
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    find_resume_checkpoint,
    list_checkpoints,
    prune,
    restore,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, check_positive
from .data import BatchStream, total_steps
from .dcp import SUFFIX, check_fits, load_sharded, model_shapes, save_sharded
from .distributed import dist_info, gather, rank0_first
from .evaluation import Batch, eval_batches, loss_sums, sample_text
from .memory import plan_and_check
from .metrics import MetricsLog, perplexity, plot_losses
from .optim import WarmupCosine, apply_freezing, make_optimizer
from .sharding import checkpointed_blocks, is_sharded, shard_model
from .step import run_rng, train_step

# ---------------------------------------------------------------- the loop


def train(
    model: GPTModel,
    train_loader: Iterable[Batch],
    val_loader: Iterable[Batch] | None = None,
    config: TrainConfig | None = None,
    **options,
) -> list[dict]:
    """Train `model` in place on batches of (input ids, target ids) and return the metric rows.

    Args:
        model: a float32 GPTModel on its device (under torchrun it is wrapped in DDP here).
        train_loader: yields (input, target) int64 batches; `len()` is needed only for `epochs`. Each epoch it
            is opened anew (`set_epoch(epoch)` is called on it or its sampler when present).
        val_loader: the same for validation, or None.
        config: a TrainConfig; keyword `options` override its fields:
        max_steps: optimizer steps to run (else `epochs` passes over train_loader, default 1).
        grad_accum: batches per optimizer step.
        lr, min_lr: peak learning rate and the floor of the cosine decay (default lr / 10).
        warmup_steps: linear warmup steps (default 5% of the run).
        weight_decay: AdamW weight decay, applied to block (and own-head) matrices only.
        grad_clip: clip the global gradient norm to this (None or 0: no clipping).
        dtype: "float32", or "bfloat16" for bf16 autocast (the weights stay float32).
        train_layers: "all" or "last:N" (last N blocks + final LayerNorm + a head not tied to tok_emb); None
            trains the parameters that require grad as the model comes (e.g. after add_lora).
        eval_every: evaluate (and log a metrics row) every this many steps and at the end; 0 = only at the end.
        eval_batches: batches of each loader to evaluate on.
        save_every: checkpoint every this many steps and at the end (needs out_dir; None/0 = only at the end).
        keep_checkpoints: how many checkpoints to keep.
        out_dir: the run folder (metrics.jsonl, loss.png, checkpoints/; rank 0 writes), locked while training.
        resume: continue from the newest usable checkpoint in out_dir/checkpoints (from scratch if none).
        seed: seeds torch, random and numpy for the run (plus the rank); the caller's RNG states are restored.
        tokenizer, sample_prompt, sample_tokens: print a greedy sample of this prompt at every evaluation.
        progress: a tqdm bar (default: only when stderr is a terminal).
        log: where progress lines go (default print on rank 0).
        run_info: extra settings stored in checkpoints and compared on resume (e.g. the data and batch size).
        loss_fn: (model, x, y) -> (summed loss, number of targets); default next-token cross-entropy with
            targets of -100 ignored. Every loss is the sum over targets divided by their count.
        count_fn: y -> number of targets that count (default: those not -100), known before the forward.
        metrics_fn: model -> dict of extra metrics (e.g. accuracies), added to every metrics row.
        strategy: under torchrun, "ddp" (a full copy per process) or "fsdp" (fully_shard per block: the model
            comes back sharded; checkpoints are sharded folders, see dcp.py). A single process ignores "ddp".
        cpu_offload: FSDP's shards, gradients and optimizer state live in host memory.
        activation_checkpointing: each block keeps only its input and recomputes the rest in the backward.
        memory_check: refuse a run whose estimated memory exceeds the device's (see memory.py).
    """
    unknown = set(options) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"train() got unknown options {sorted(unknown)}")
    cfg = replace(config or TrainConfig(), **options)
    cfg.check()
    base: GPTModel = getattr(model, "module", model)
    amp = pick_dtype(cfg.dtype)
    if amp not in (torch.float32, torch.bfloat16):
        raise Gpt2LoadError(f"--dtype {cfg.dtype} is not supported for training: use float32 or bfloat16")
    refuse_quantized(base, "cannot be trained", "load it without quantize (float32) to train, then quantize the result")
    if any(p.dtype != torch.float32 for p in base.parameters()):
        raise Gpt2LoadError("train needs a float32 model; pass dtype='bfloat16' for bf16 autocast instead")
    device = base.tok_emb.weight.device
    rank, _ = dist_info()
    lock = rank0_first(lambda: open_run_folder(cfg.out_dir) if cfg.out_dir is not None and rank == 0 else None)
    try:
        with run_rng(cfg.seed + rank, device):
            return _Run(model, base, train_loader, val_loader, cfg, amp, device).run()
    finally:
        if lock is not None:
            lock.release()


class _Run:
    """One call of `train`: its state (step, tokens, rows) and the pieces that act on it."""

    def __init__(self, model, base: GPTModel, train_loader, val_loader, cfg: TrainConfig, amp, device) -> None:
        self.rank, self.world = dist_info()
        self.base, self.cfg, self.amp, self.device = base, cfg, amp, device
        self.train_loader, self.val_loader = train_loader, val_loader
        self.log = cfg.log or (print if self.rank == 0 else (lambda msg: None))
        self.trainable = apply_freezing(base, cfg.train_layers)
        self.sharded = cfg.strategy == "fsdp" and self.world > 1
        plan_and_check(base, train_loader, cfg.strategy, self.world, amp, device, cfg, self.log)
        self.backend = getattr(base, "backend", None)
        if self.sharded:
            set_backend(base, None)  # the speed layer's cached fused weights would not follow FSDP's gathers
            if not is_sharded(base):
                shard_model(base, amp, device, cfg.cpu_offload)
            self.trainable = list({id(p): p for p in base.parameters() if p.requires_grad}.values())
        self.trainable_names = [n for n, p in base.named_parameters() if p.requires_grad]
        self.total = total_steps(cfg.max_steps, cfg.epochs, train_loader, cfg.grad_accum)
        warmup = round(0.05 * self.total) if cfg.warmup_steps is None else cfg.warmup_steps
        min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
        self.settings = {
            "total_steps": self.total,
            "grad_accum": cfg.grad_accum,
            "lr": cfg.lr,
            "min_lr": min_lr,
            "warmup_steps": warmup,
            "weight_decay": cfg.weight_decay,
            "grad_clip": cfg.grad_clip,
            "dtype": str(amp).removeprefix("torch."),
            "train_layers": cfg.train_layers,
            "seed": cfg.seed,
            "world_size": self.world,
            **(cfg.run_info or {}),
        }
        self.optimizer = make_optimizer(base, cfg.lr, cfg.weight_decay)
        self.schedule = WarmupCosine(self.optimizer, cfg.lr, min_lr, warmup, self.total)
        out = Path(cfg.out_dir) if cfg.out_dir is not None else None
        self.out, self.ck_dir = out, (out / "checkpoints" if out else None)
        self.metrics = MetricsLog(out / "metrics.jsonl") if out else None
        self.step, self.tokens_seen, self.batches = 0, 0, BatchStream(train_loader)
        self.rows: list[dict] = []
        self.net = model
        if self.world > 1 and model is base and not self.sharded:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(base, device_ids=ids, broadcast_buffers=False)
        self.timer = {"train_s": 0.0, "tokens": 0}
        self.bar = None

    def warn(self, msg: str) -> None:
        if self.rank == 0:
            print(f"gpt2load: warning: {msg}", file=sys.stderr, flush=True)

    def say(self, msg: str) -> None:
        (self.bar.write if self.bar else self.log)(msg)

    def start(self) -> None:
        """Where the run begins: step 0, or the newest usable checkpoint when resuming."""
        if self.out is None:
            return
        if not self.cfg.resume and (list_checkpoints(self.ck_dir) or self.metrics.rows()):
            raise Gpt2LoadError(
                f"{self.out} already holds a training run: pass --resume to continue it, or another --out"
            )
        if not self.cfg.resume:
            return
        found = find_resume_checkpoint(self.ck_dir, self.device, self.warn)
        if found is None:
            self.log("gpt2load: no checkpoint to resume from; starting at step 0")
        else:
            path, ck = found
            if path.name.endswith(SUFFIX):  # sharded: read back resharded to this run's processes
                check_fits(path, ck, self.base, self.trainable_names, self.cfg.train_layers)
                load_sharded(path, self.base, self.optimizer)
                self.schedule.load_state_dict(ck["scheduler"])
            elif self.sharded:
                raise Gpt2LoadError(
                    f"{path} was written by a run without FSDP: resume it with --strategy ddp (or in one process)"
                )
            else:
                restore(path, ck, self.base, self.optimizer, self.schedule, self.cfg.train_layers)
            self.step, self.tokens_seen = ck["step"], ck["tokens_seen"]
            was = ck["settings"]
            changed = [f"{k} {was.get(k)} -> {v}" for k, v in self.settings.items() if was.get(k) != v]
            if changed:
                self.warn(f"resuming with changed settings ({', '.join(changed)}): results will differ from one run")
            epoch_rng = None
            if len(ck["rng"]) == self.world:
                set_rng_state(ck["rng"][self.rank])
                epoch_rng = ck["rng"][self.rank]["epoch_rng"]
            else:
                self.warn(f"the checkpoint has RNG states for {len(ck['rng'])} processes, this run has {self.world}")
            self.batches = BatchStream(self.train_loader, ck["data"]["epoch"], ck["data"]["position"], epoch_rng)
            self.log(f"gpt2load: resuming from {path} (step {self.step}/{self.total})")
        if self.rank == 0:  # rows after the checkpoint are written again; all of them only on a true restart
            self.rows = self.metrics.truncate(self.step if found else -1)

    def _mean(self, loader) -> float | None:
        batches = eval_batches(loader, self.cfg.eval_batches)
        total, count = loss_sums(self.base, batches, self.amp, self.cfg.loss_fn)
        return total / count if count else None

    def record(self) -> None:
        with torch.random.fork_rng(devices=[]):  # opening a shuffling loader draws from the training RNG
            train_loss = self._mean(self.train_loader)
            val_loss = self._mean(self.val_loader) if self.val_loader else None
            extra = self.cfg.metrics_fn(self.base) if self.cfg.metrics_fn else {}
        t = self.timer
        tps = t["tokens"] / t["train_s"] if t["train_s"] > 0 else None
        t.update(train_s=0.0, tokens=0)
        row = {
            "step": self.step,
            "epoch": self.batches.epoch,
            "tokens_seen": self.tokens_seen,
            "lr": self.schedule.lr_at(max(self.step - 1, 0)),  # the rate of the step just taken
            "train_loss": train_loss,
            "train_ppl": perplexity(train_loss),
            "val_loss": val_loss,
            "val_ppl": perplexity(val_loss),
            "tokens_per_s": tps,
            **extra,
        }
        self.rows.append(row)
        sampling = self.cfg.sample_prompt is not None and self.cfg.tokenizer is not None
        # under FSDP every rank generates: each forward gathers the shards from all of them
        sample = self.sample() if sampling and (self.sharded or self.rank == 0) else None
        if self.rank != 0:
            return
        if self.metrics:
            self.metrics.append(row)
        val = f"  val {val_loss:.4f} (ppl {perplexity(val_loss):.2f})" if val_loss is not None else ""
        speed = f"  {tps:,.0f} tok/s" if tps else ""
        train_text = f"{train_loss:.4f}" if train_loss is not None else "n/a"
        self.say(f"step {self.step}/{self.total}  tokens {self.tokens_seen:,}  train {train_text}{val}{speed}")
        if sample is not None:
            self.say(f"sample: {self.cfg.sample_prompt}{sample}")

    def sample(self) -> str:
        text = sample_text(self.base, self.cfg.tokenizer, self.cfg.sample_prompt, self.cfg.sample_tokens)
        return text.replace(chr(10), " ")

    def checkpoint(self) -> None:
        states = gather(rng_state(self.batches.epoch_rng))  # every rank's RNG (dropout differs per rank)
        if self.sharded:
            meta = {**self.payload(states), "shapes": model_shapes(self.base), "trainable": self.trainable_names}
            save_sharded(self.ck_dir / f"step-{self.step:06d}{SUFFIX}", self.base, self.optimizer, meta)
            if self.rank == 0:
                prune(self.ck_dir, self.cfg.keep_checkpoints)
            return
        if self.rank != 0:
            return
        payload = {
            **self.payload(states),
            "model": stored_state(self.base),
            "optimizer": self.optimizer.state_dict(),
        }
        save_checkpoint(self.ck_dir / f"step-{self.step:06d}.pt", payload)
        prune(self.ck_dir, self.cfg.keep_checkpoints)

    def payload(self, states: list) -> dict:
        """What a checkpoint holds besides the weights and the optimizer state."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "config": self.base.cfg.to_dict(),
            "scheduler": self.schedule.state_dict(),
            "data": {"epoch": self.batches.epoch, "position": self.batches.position, "shuffle_seed": self.cfg.seed},
            "rng": states,
            "settings": self.settings,
        }

    def run(self) -> list[dict]:
        try:
            with checkpointed_blocks(self.base, self.cfg.activation_checkpointing):
                return self._run()
        finally:
            set_backend(self.base, self.backend)

    def _run(self) -> list[dict]:
        cfg = self.cfg
        self.start()
        if cfg.progress if cfg.progress is not None else sys.stderr.isatty():
            if self.rank == 0:
                from tqdm import tqdm  # only when a bar is shown

                self.bar = tqdm(total=self.total, initial=self.step, unit="step", dynamic_ncols=True, desc="training")
        if self.step == 0 and cfg.eval_every:
            self.record()
        self.base.train()
        while self.step < self.total:
            t0 = time.perf_counter()
            step_loss, tokens = train_step(self.net, self.batches, cfg, self.amp, self.device, self.world)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += tokens
            self.timer["tokens"] += tokens
            self.timer["train_s"] += time.perf_counter() - t0
            if self.bar:
                tps = self.timer["tokens"] / self.timer["train_s"] if self.timer["train_s"] else 0.0
                self.bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                self.bar.update(1)
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total:
                self.record()
            if self.out and ((cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.total):
                self.checkpoint()
        if self.bar:
            self.bar.close()
        self.base.eval()
        if self.out and self.rank == 0 and not plot_losses(self.rows, self.out / "loss.png"):
            self.log("gpt2load: matplotlib is not installed, so no loss.png (pip install 'gpt2load[plot]')")
        return self.rows


__all__ = ["TrainConfig", "check_positive", "train"]
