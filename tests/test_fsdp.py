"""FSDP (`--strategy fsdp`) under torchrun with gloo on the CPU: two processes with half the batch equal one
process with all of it, the tied head survives sharding and saving, sharded checkpoints resume after kill -9 on
the same and on another number of processes, gradients are averaged (not summed: PyTorch issue 162338),
activation checkpointing changes no gradient, the memory estimate, and the one-line refusals.

Run as a script (under torchrun) this file is the worker that computes one step's gradients under FSDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import ENV, make_corpus, make_model, max_diff, metrics, torchrun, torchrun_cmd, train_cmd

from gpt2load.cli.main import main
from gpt2load.errors import Gpt2LoadError
from gpt2load.load import load_gpt2
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.training.config import TrainConfig
from gpt2load.training.memory import Plan, check_fits, estimate
from gpt2load.training.sharding import checkpointed_blocks
from gpt2load.training.step import train_step

SMALL = GPTConfig(vocab_size=96, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
# 48 steps, a sharded checkpoint every 4: long enough for a kill to land mid-run
FLAGS = ["--max-steps", "48", "--eval-every", "16", "--save-every", "4", "--keep-checkpoints", "2", "--grad-accum", "2"]
MODES = ("float32", "bfloat16", "checkpointed", "offload")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one(model_dir, corpus, tmp_path_factory) -> Path:
    """One process with the whole batch (4 windows)."""
    out = tmp_path_factory.mktemp("runs") / "one"
    assert main(train_cmd(model_dir, corpus, out, *FLAGS, "--batch-size", "4")) == 0
    return out


@pytest.fixture(scope="module")
def two(model_dir, corpus, tmp_path_factory) -> Path:
    """Two FSDP processes with 2 windows each, never interrupted."""
    out = tmp_path_factory.mktemp("runs") / "two"
    proc = torchrun(*train_cmd(model_dir, corpus, out, *FLAGS, "--batch-size", "2", "--strategy", "fsdp"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory per process (estimate)" in proc.stdout
    return out


def test_two_fsdp_processes_match_one_process_and_keep_the_tie(one, two):
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 16, 32, 48]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens_seen"] == rb["tokens_seen"]
        for key in ("train_loss", "val_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), key
    assert a[-1]["train_loss"] < a[0]["train_loss"] - 1.0  # it learned
    # Key biases get an exactly zero gradient (softmax ignores a constant per query row), so Adam turns mere
    # rounding noise into lr-sized steps there; every other weight agrees to float32 rounding.
    assert max_diff(one, two, skip="att.W_key.bias") < 1e-5
    shards = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert shards == ["step-000044.dcp", "step-000048.dcp"]
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt", "manifest.sha256"} <= {
        p.name for p in (two / "checkpoints" / "step-000048.dcp").iterdir()
    }
    stored = load_file(two / "final" / "model.safetensors")
    assert "out_head.weight" not in stored  # gpt2load's form stores a tied head once
    model = load_gpt2(two, device="cpu")
    assert model.out_head.weight is model.tok_emb.weight


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (read from /proc: torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _start_killed(model_dir, corpus, out: Path) -> None:
    """Start a 2-process FSDP run and kill -9 all of it once its first sharded checkpoint is in place."""
    cmd = torchrun_cmd("-m", "gpt2load", *train_cmd(model_dir, corpus, out, *FLAGS, "--batch-size", "2"))
    cmd += ["--strategy", "fsdp"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck, deadline = out / "checkpoints", time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if ck.is_dir() and any(f.name.endswith(".dcp") for f in ck.iterdir()):
            break
        time.sleep(0.002)
    workers = _descendants(p.pid)
    for pid in [p.pid, *workers]:  # the torchrun agent and both workers (their own sessions), at once
        os.kill(pid, signal.SIGKILL)
    p.wait()
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # reaped by init once the agent is gone
        time.sleep(0.01)
    done = [int(f.name[5:11]) for f in ck.glob("step-*.dcp")]
    assert done and max(done) < 48, done  # killed mid-run, with a checkpoint to resume from


def test_kill_9_then_resume_on_two_processes_and_on_one(model_dir, corpus, two, one, tmp_path):
    killed = tmp_path / "killed"
    _start_killed(model_dir, corpus, killed)
    again = tmp_path / "again"
    shutil.copytree(killed, again)

    proc = torchrun(
        *train_cmd(model_dir, corpus, killed, *FLAGS, "--batch-size", "2", "--strategy", "fsdp"), "--resume"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    want, got = load_file(two / "final" / "model.safetensors"), load_file(killed / "final" / "model.safetensors")
    assert all(torch.equal(want[k], got[k]) for k in want), "same processes: the very same weights"
    assert metrics(killed) == metrics(two)

    # two processes -> one: DCP reshards the weights and optimizer state into an unsharded model
    assert main(train_cmd(model_dir, corpus, again, *FLAGS, "--batch-size", "4", "--resume")) == 0
    assert max_diff(again, two, skip="att.W_key.bias") < 1e-5
    assert max_diff(again, one, skip="att.W_key.bias") < 1e-5
    assert [r["step"] for r in metrics(again)] == [0, 16, 32, 48]
    assert load_gpt2(again, device="cpu").head_tied


# ---------------------------------------------------------------- gradients: averaged, checkpointed, offloaded


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 96, (4, 12), generator=g), torch.randint(0, 96, (4, 12), generator=g)


def _model(drop: float = 0.0) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**SMALL.to_dict(), "drop_rate": drop}))


def _grads(model: GPTModel, x, y, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """One step of the loop's own forward/backward (train_step) in this process."""
    train_step(model, iter([(x, y)]), TrainConfig(), dtype, torch.device("cpu"), 1)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(out: Path, device: str) -> None:
    """Under torchrun: each rank takes its half of the batch; the gathered gradients of every mode go to out."""
    from gpt2load.training.distributed import init_distributed, shutdown
    from gpt2load.training.sharding import gather_tensor, shard_model

    rank, world, dev = init_distributed(device)
    x, y = _batch()
    half = x.shape[0] // world
    x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    result = {}
    for mode in MODES:
        model = _model().to(dev)
        dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
        shard_model(model, dtype, dev, cpu_offload=mode == "offload")
        held = sum(p.to_local().numel() for p in model.parameters()) * 4
        with checkpointed_blocks(model, mode == "checkpointed"):
            train_step(model, iter([(x, y)]), TrainConfig(), dtype, dev, world)
        result[mode] = {n: gather_tensor(p.grad) for n, p in model.named_parameters()}
        result[mode + ":bytes"] = torch.tensor(held)
        result[mode + ":tied"] = torch.tensor(model.out_head.weight is model.tok_emb.weight)
    if rank == 0:
        torch.save(result, out)
    shutdown()


def test_fsdp_gradients_are_the_mean_in_every_mode(tmp_path):
    """Against one process on the whole batch: float32, checkpointed and offloaded to float32 rounding; bfloat16
    (compute and reduction) within bf16's error, far from the factor 2 a summed reduction would give."""
    out = tmp_path / "grads.pt"
    cmd = torchrun_cmd(__file__, "--worker", str(out), "cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    want = _grads(_model(), *_batch())
    for mode in MODES:
        assert bool(got[mode + ":tied"]), mode
        for name, g in want.items():
            if name.endswith("W_key.bias"):  # its true gradient is zero: only rounding noise to compare
                continue
            if mode == "bfloat16":
                rel = ((got[mode][name] - g).norm() / g.norm().clamp_min(1e-12)).item()
                assert g.norm() == 0 or rel < 0.05, (mode, name, rel)
            else:
                torch.testing.assert_close(got[mode][name], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {name}")
    # the estimate's weights per process are the shards each rank holds (up to padding to the world size)
    with torch.device("meta"):
        meta = GPTModel(SMALL)
    est = estimate(meta, Plan("fsdp", 2, torch.float32, 2, 12))
    assert abs(est.weights - int(got["float32:bytes"])) <= 4 * 2 * len(list(meta.parameters()))


def test_activation_checkpointing_gives_the_same_gradients_with_dropout():
    x, y = _batch()
    plain = _grads(_model(drop=0.2), x, y)
    model = _model(drop=0.2)
    with checkpointed_blocks(model):
        checkpointed = _grads(model, x, y)
    assert "forward" not in vars(model.trf_blocks[0])  # the block's own forward is back
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_flag_trains_like_without(model_dir, corpus, tmp_path):
    flags = ["--max-steps", "4", "--eval-every", "2", "--save-every", "4", "--batch-size", "2", "--dropout", "0.1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(train_cmd(model_dir, corpus, a, *flags)) == 0
    assert main(train_cmd(model_dir, corpus, b, *flags, "--activation-checkpointing")) == 0
    for ra, rb in zip(metrics(a), metrics(b), strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    assert max_diff(a, b, skip="att.W_key.bias") < 1e-5


# ---------------------------------------------------------------- fine-tuning under FSDP

RECORDS = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"Word {i}."} for i in range(8)]


def test_finetune_instruct_with_fsdp_matches_one_process(model_dir, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    common = ["finetune", "instruct", "--model", str(model_dir), "--data", str(data), "--epochs", "3"]
    common += ["--lr", "1e-2", "--eval-every", "3", "--device", "cpu", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*common, "--out", str(one), "--batch-size", "4"]) == 0
    proc = torchrun(*common, "--out", str(two), "--batch-size", "2", "--strategy", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5), ra
    assert max_diff(one, two, skip="att.W_key.bias") < 1e-5
    assert load_gpt2(two, device="cpu").head_tied


# ---------------------------------------------------------------- one clear line


def test_strategy_errors_are_one_line(model_dir, corpus, two, tmp_path, capsys):
    base = ["--max-steps", "2", "--batch-size", "2"]
    cases = [
        (["--strategy", "fsdp"], "run under torchrun"),
        (["--cpu-offload"], "--cpu-offload moves FSDP's shards"),
    ]
    for i, (args, needle) in enumerate(cases):
        assert main(train_cmd(model_dir, corpus, tmp_path / f"o{i}", *base, *args)) == 1, args
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpt2load: error:") and needle in lines[0], lines
    # a sharded checkpoint resumed with another model shape (LoRA adapters added)
    sharded = tmp_path / "sharded"
    shutil.copytree(two, sharded)
    shutil.rmtree(sharded / "final")
    assert main(train_cmd(model_dir, corpus, sharded, *FLAGS, "--batch-size", "4", "--resume", "--lora-rank", "2")) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("gpt2load:")]
    assert len(lines) == 1 and "another configuration" in lines[0], lines


def test_a_run_that_cannot_fit_is_refused_with_the_flags_that_fit():
    with torch.device("meta"):
        big = GPTModel(GPTConfig.from_name("1558M"))
    plan = Plan("ddp", 2, torch.float32, 8, 1024)
    with pytest.raises(Gpt2LoadError) as e:
        check_fits(big, plan, 24e9, "cuda:0")
    msg = str(e.value)
    assert "needs about" in msg and "--strategy fsdp" in msg and "24.00 GB" in msg, msg
    fix = msg.split("try ")[1].split(" (")[0]
    assert "--strategy fsdp" in fix
    one_gpu = Plan("ddp", 1, torch.float32, 8, 1024)
    with pytest.raises(Gpt2LoadError, match="--activation-checkpointing|--batch-size"):
        check_fits(big, one_gpu, 24e9, "cuda:0")
    assert estimate(big, Plan("fsdp", 4, torch.float32, 1, 1024)).total < estimate(big, plan).total / 2


# ---------------------------------------------------------------- GPUs (NCCL): run with -m gpu on a GPU box


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_fsdp_on_two_gpus_matches_one_gpu(model_dir, corpus, tmp_path):
    flags = ["--max-steps", "6", "--eval-every", "3", "--save-every", "6", "--context-length", "16"]
    flags += ["--eval-batches", "2", "--lr", "3e-3", "--quiet"]
    base = ["train", "--model", str(model_dir), "--data", str(corpus)]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*base, "--out", str(one), *flags, "--batch-size", "4", "--device", "cuda"]) == 0
    proc = torchrun(*base, "--out", str(two), *flags, "--batch-size", "2", "--device", "cuda", "--strategy", "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for ra, rb in zip(metrics(one), metrics(two), strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
    assert max_diff(one, two, skip="att.W_key.bias") < 1e-4
    out = tmp_path / "grads.pt"
    proc = subprocess.run(torchrun_cmd(__file__, "--worker", str(out), "cuda"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = torch.load(out, weights_only=True), _grads(_model(), *_batch())
    for name, g in want.items():
        torch.testing.assert_close(got["float32"][name], g, rtol=1e-4, atol=1e-6, msg=name)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    torch.set_num_threads(1)
    _worker(Path(sys.argv[2]), sys.argv[3])


def test_train_refuses_a_run_over_the_device_memory_and_no_memory_check_runs_it(
    model_dir, corpus, tmp_path, capsys, monkeypatch
):
    """The refusal end to end: a device of 1 MB (the machine's size stood in for) cannot hold the tiny run."""
    import gpt2load.training.memory as memory

    monkeypatch.setattr(memory, "device_capacity", lambda device, here: 1e6)
    flags = ["--max-steps", "1", "--batch-size", "2", "--eval-every", "0"]
    assert main(train_cmd(model_dir, corpus, tmp_path / "a", *flags)) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2load: error: training needs about"), lines
    assert "has 1.0 MB" in lines[0] and "--no-memory-check" in lines[0]
    assert not list((tmp_path / "a").glob("checkpoints/*"))
    assert main(train_cmd(model_dir, corpus, tmp_path / "b", *flags, "--no-memory-check")) == 0
    assert "memory per process (estimate)" in capsys.readouterr().out
