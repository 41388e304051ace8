"""Continued pretraining: the loop, exact resume after kill -9, corrupt checkpoints, DDP, freezing, the CLI."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOKENIZER_DIR, assert_clean_error
from safetensors.torch import load_file
from train_helpers import CFG, COMMON, ENV, make_corpus, make_model, max_diff, metrics, run, torchrun, train_cmd

from gpt2load import evaluate  # the public API
from gpt2load.cli.main import main
from gpt2load.errors import Gpt2LoadError
from gpt2load.load import load_gpt2
from gpt2load.model.gpt import GPTModel
from gpt2load.tokenizer import encode, tokenizer_from_folder
from gpt2load.training.data import TokenWindows, WindowLoader
from gpt2load.training.loop import TrainConfig, train
from gpt2load.training.metrics import plot_losses
from gpt2load.training.optim import WarmupCosine, make_optimizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


def loaders(corpus: Path, batch: int = 4, length: int = 16):
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    tokens = np.array(encode(enc, corpus.read_text(encoding="utf-8")), dtype=np.uint16)
    cut = int(len(tokens) * 0.9)
    train_w, val_w = TokenWindows(tokens[:cut], length, length), TokenWindows(tokens[cut:], length, length)
    return WindowLoader(train_w, batch, seed=1), WindowLoader(val_w, batch, shuffle=False), train_w


# ---------------------------------------------------------------- the loop (Python API)


def test_loss_goes_down_from_loaded_weights(model_dir, corpus, tmp_path):
    model = load_gpt2(model_dir, device="cpu")
    train_loader, val_loader, _ = loaders(corpus)
    rows = train(model, train_loader, val_loader, max_steps=30, lr=3e-3, eval_every=15, eval_batches=4)
    assert [r["step"] for r in rows] == [0, 15, 30]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert rows[-1]["val_ppl"] == pytest.approx(np.exp(rows[-1]["val_loss"]))
    assert rows[-1]["tokens_seen"] == 30 * 4 * 16
    assert not model.training


def test_plain_dataloader_resumes_exactly_after_a_crash(model_dir, corpus, tmp_path):
    """A user's shuffled torch DataLoader, dropout on, a crash mid-epoch: resuming matches a run never stopped."""
    _, _, windows = loaders(corpus)
    opts = dict(max_steps=12, eval_every=4, eval_batches=2, save_every=3, lr=3e-3, seed=3, progress=False)

    def fresh():
        model = load_gpt2(model_dir, device="cpu")
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.2
        return model

    def dl():  # 5 batches an epoch: the crash comes in the second epoch
        subset = torch.utils.data.Subset(windows, range(20))
        return torch.utils.data.DataLoader(subset, batch_size=4, shuffle=True, drop_last=True)

    whole = fresh()
    want = train(whole, dl(), None, out_dir=tmp_path / "a", **opts)

    class Crash(Exception):
        pass

    class Crashing:
        def __init__(self, loader, after):
            self.loader, self.left = loader, after

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                if self.left == 0:
                    raise Crash
                self.left -= 1
                yield batch

    # evaluations read 2 batches of the train loader too: 2 + 4 + 2 + 4 + 2 batches are read before step 9
    with pytest.raises(Crash):  # dies in step 9 (epoch 2), after the checkpoint of step 6
        train(fresh(), Crashing(dl(), 14), None, out_dir=tmp_path / "b", **opts)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("*.pt")) == ["step-000003.pt", "step-000006.pt"]
    resumed = fresh()
    got = train(resumed, dl(), None, out_dir=tmp_path / "b", resume=True, **opts)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in want]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in got] == strip
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_gradient_accumulation_equals_the_bigger_batch(model_dir, corpus):
    _, _, windows = loaders(corpus)
    models = []
    for batch, accum in ((4, 1), (2, 2)):
        model = load_gpt2(model_dir, device="cpu")
        train(model, WindowLoader(windows, batch, shuffle=False), max_steps=3, grad_accum=accum, eval_every=0)
        models.append(model.state_dict())
    for k, v in models[0].items():
        if not k.endswith("att.W_key.bias"):  # zero true gradient: see the two-process test
            torch.testing.assert_close(v, models[1][k], atol=1e-6, rtol=0, msg=k)


def test_freezing_leaves_frozen_weights_bit_identical(model_dir, corpus):
    model = load_gpt2(model_dir, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_loader, _, _ = loaders(corpus)
    train(model, train_loader, max_steps=4, eval_every=0, train_layers="last:1", lr=1e-2)
    after = model.state_dict()
    trained = {k for k in after if k.startswith(("trf_blocks.1.", "final_norm.")) and not k.endswith("mask")}
    for k in after:
        assert torch.equal(before[k], after[k]) == (k not in trained), k
    with pytest.raises(Gpt2LoadError, match="has 2 blocks, so use last:1 to last:2"):
        train(model, train_loader, max_steps=1, train_layers="last:99")
    with pytest.raises(Gpt2LoadError, match="all or last:N"):
        train(model, train_loader, max_steps=1, train_layers="first:1")


def test_freezing_never_freezes_a_head_of_its_own(model_dir, corpus):
    """A head that is not the token embedding's Parameter (untied copy, chapter 6's classifier) trains."""
    model = load_gpt2(model_dir, device="cpu")
    model.out_head.weight = torch.nn.Parameter(model.tok_emb.weight.detach().clone())  # same values, untied
    head, emb = model.out_head.weight.detach().clone(), model.tok_emb.weight.detach().clone()
    train_loader, _, _ = loaders(corpus)
    train(model, train_loader, max_steps=2, eval_every=0, train_layers="last:1", lr=1e-2)
    assert not torch.equal(model.out_head.weight, head)
    assert torch.equal(model.tok_emb.weight, emb)


def test_evaluate_ignores_minus_100_targets_token_weighted():
    torch.manual_seed(0)
    model = GPTModel(CFG).eval()
    xs = torch.randint(0, CFG.vocab_size, (3, 2, 8))
    ys = torch.randint(0, CFG.vocab_size, (3, 2, 8))
    ys[0, :, 4:] = -100  # half of the first batch's targets
    ys[1, 1, :] = -100
    ys[2, :, :6] = -100  # batches with different numbers of counted targets: the mean weights targets
    with torch.no_grad():
        logits = torch.cat([model(x) for x in xs])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ys.flatten(0, 1).flatten(), ignore_index=-100)
    got = evaluate(model, list(zip(xs, ys, strict=True)))
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert evaluate(model, list(zip(xs, ys, strict=True)), max_batches=1) == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:2].flatten(0, 1), ys[0].flatten(), ignore_index=-100).item(),
        rel=1e-5,
    )
    with pytest.raises(Gpt2LoadError, match="no targets"):
        evaluate(model, [(xs[0], torch.full_like(ys[0], -100))])


def test_train_leaves_the_callers_rng_states_alone(model_dir, corpus):
    model = load_gpt2(model_dir, device="cpu")
    train_loader, _, _ = loaders(corpus)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    train(model, train_loader, max_steps=2, eval_every=0, seed=5)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], want[0]) and got[1:] == want[1:]


def test_a_loss_hook_plugs_another_objective_into_the_loop(model_dir, corpus):
    """TrainConfig.loss_fn: here only the last position counts, as in a classification recipe."""
    calls = []

    def last_token(model, x, y):
        calls.append(x.shape)
        logits = model(x)[:, -1, :]
        return torch.nn.functional.cross_entropy(logits, y[:, -1], reduction="sum"), y.shape[0]

    model = load_gpt2(model_dir, device="cpu")
    train_loader, val_loader, _ = loaders(corpus)
    config = TrainConfig(max_steps=6, eval_every=6, eval_batches=2, lr=3e-3, loss_fn=last_token, count_fn=len)
    rows = train(model, train_loader, val_loader, config)
    assert len(calls) == 6 + 2 * 2 * 2  # 6 steps, and 2 evaluations of 2 batches of each loader
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_weight_decay_spares_biases_norms_embeddings_and_the_tied_head_once():
    model = GPTModel(CFG)
    opt = make_optimizer(model, 1e-3, 0.1)
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(model.out_head.weight) in no_decay and id(model.tok_emb.weight) in no_decay
    assert id(model.pos_emb.weight) in no_decay
    assert id(model.trf_blocks[0].att.W_query.weight) in decay
    assert id(model.trf_blocks[0].att.W_query.bias) in no_decay
    assert id(model.trf_blocks[0].norm1.scale) in no_decay
    flat = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(flat) == len(set(flat)) == len({id(p) for p in model.parameters()})


def test_warmup_then_cosine_to_min_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, lr=1.0, min_lr=0.1, warmup=4, total=14)
    lrs = [s.lr_at(i) for i in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert s.lr_at(14) == pytest.approx(0.1)
    assert opt.param_groups[0]["lr"] == 0.25
    s.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_bfloat16_autocast_trains(model_dir, corpus):
    model = load_gpt2(model_dir, device="cpu")
    train_loader, val_loader, _ = loaders(corpus)
    rows = train(model, train_loader, val_loader, max_steps=10, dtype="bfloat16", eval_every=10, eval_batches=2)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert model.tok_emb.weight.dtype == torch.float32


def test_loss_png_is_skipped_without_matplotlib(monkeypatch, tmp_path):
    rows = [{"tokens_seen": 0, "train_loss": 3.0, "val_loss": 3.1}, {"tokens_seen": 64, "train_loss": 2.0}]
    pytest.importorskip("matplotlib")
    assert plot_losses(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert not plot_losses(rows, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------- the CLI: outputs, resume, corruption


def test_exact_resume_after_kill_9(model_dir, corpus, tmp_path):
    """Uninterrupted run vs a run killed twice (once as soon as a checkpoint is being written or has been
    written) and resumed: the same final weights and the same metrics rows, none duplicated.

    The run is long (96 steps, a checkpoint every 4) so that the kill lands seconds before its end: each kill
    is asserted to have happened, and to have left the run unfinished."""
    total = 96
    flags = ["--max-steps", str(total), "--save-every", "4", "--eval-every", "16", "--keep-checkpoints", "2"]
    flags += ["--dropout", "0.1", "--batch-size", "2", "--seed", "7"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(train_cmd(model_dir, corpus, whole, *flags)) == 0  # in this process, one thread like the others

    def kill_when(after_step: int) -> None:
        ck = killed / "checkpoints"
        stale = {f.name for f in ck.iterdir()} if ck.is_dir() else set()  # temp files of an earlier kill
        p = subprocess.Popen(
            [sys.executable, "-m", "gpt2load", *train_cmd(model_dir, corpus, killed, *flags, "--resume")],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:
            names = [f.name for f in ck.iterdir() if f.name not in stale] if ck.is_dir() else []
            steps = [int(n[5:11]) for n in names if n.startswith("step-") and n.endswith(".pt")]
            writing = [n for n in names if n.startswith(".step-") and n.endswith(".tmp")]
            if (steps and max(steps) > after_step) or (writing and after_step > 0):
                break
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        done = [int(f.name[5:11]) for f in ck.glob("step-*.pt")]
        assert done and max(done) < total, done  # killed mid-run, with a checkpoint to resume from

    kill_when(0)  # after its first checkpoint
    first = max(int(p.name[5:11]) for p in (killed / "checkpoints").glob("step-*.pt"))
    kill_when(first)  # while writing or just after writing a later checkpoint
    proc = run(*train_cmd(model_dir, corpus, killed, *flags, "--resume"))
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    assert max_diff(whole, killed) <= 1e-6
    assert metrics(killed) == metrics(whole)
    assert [r["step"] for r in metrics(whole)] == list(range(0, total + 1, 16))
    assert len(list((killed / "checkpoints").glob("step-*.pt"))) == 2
    assert not list((killed / "checkpoints").glob(".*tmp"))


def test_corrupt_checkpoint_falls_back_to_the_previous_one(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--max-steps", "6", "--save-every", "2", "--eval-every", "2", "--batch-size", "2"]
    assert main(train_cmd(model_dir, corpus, out, *flags)) == 0
    want_rows, want = metrics(out), load_file(out / "final" / "model.safetensors")
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in ckpts] == ["step-000002.pt", "step-000004.pt", "step-000006.pt"]
    data = ckpts[-1].read_bytes()
    ckpts[-1].write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    stale = [out / ".final.4194305.abcdef12.tmp", out / "checkpoints" / ".step-000008.pt.k3j_x9ab.tmp"]
    stale[0].mkdir()  # left by kill -9 while saving the final model / writing a checkpoint
    (stale[0] / "model.safetensors").write_bytes(b"partial")
    stale[1].write_bytes(b"partial")
    capsys.readouterr()
    assert main(train_cmd(model_dir, corpus, out, *flags, "--resume")) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("gpt2load: warning:")]
    assert len(warnings) == 1 and "step-000006.pt is damaged" in warnings[0], captured.err
    assert "resuming from" in captured.out and "step-000004.pt" in captured.out
    assert metrics(out) == want_rows
    got = load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "checkpoints" / "step-000006.pt").is_file()  # written again
    assert (out / "checkpoints" / "step-000006.pt.corrupt").is_file()
    assert not any(p.exists() for p in stale)


def test_final_model_generates_and_exports_to_transformers(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_cmd(model_dir, corpus, out, "--max-steps", "3", "--eval-every", "3", "--sample-prompt", "A")) == 0
    assert {"metrics.jsonl", "checkpoints", "final", "tokens"} <= {p.name for p in out.iterdir()}
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row) >= {"step", "tokens_seen", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s"}
    assert "sample: A" in capsys.readouterr().out

    hf_dir = tmp_path / "hf"
    proc = run("convert", "--model", str(out / "final"), "--to", "hf", "--out", str(hf_dir), "--quiet")
    assert proc.returncode == 0, proc.stderr
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = load_gpt2(out / "final", device="cpu")
    ids = torch.tensor([[464, 3797, 1650, 319, 262]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)

    gen = ["--prompt", "The cat", "--max-new-tokens", "5", "--json", "--device", "cpu"]
    proc = run("generate", "--model", str(out), *gen)  # the run folder itself is a model folder
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)


# ---------------------------------------------------------------- two processes (torchrun, gloo)


def test_two_processes_match_one_process_with_the_whole_batch(model_dir, corpus, tmp_path):
    flags = ["--max-steps", "6", "--eval-every", "3", "--save-every", "6", "--grad-accum", "2"]  # no_sync too
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_cmd(model_dir, corpus, one, *flags, "--batch-size", "4")) == 0
    proc = torchrun(*train_cmd(model_dir, corpus, two, *flags, "--batch-size", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 3, 6]
    for ra, rb in zip(a, b, strict=True):
        assert ra["tokens_seen"] == rb["tokens_seen"]
        for key in ("train_loss", "val_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5), key
    assert ra["train_loss"] != a[0]["train_loss"]
    # Key biases get an exactly zero gradient (softmax ignores a constant per query row), so Adam turns mere
    # rounding noise into lr-sized steps there; every other weight agrees to float32 rounding.
    assert max_diff(one, two, skip="att.W_key.bias") < 1e-6
    assert len(list(two.glob("**/step-*.pt"))) == 1  # rank 1 wrote nothing of its own


# ---------------------------------------------------------------- bad inputs: one line, exit 1


def test_bad_inputs_give_one_clear_line(model_dir, corpus, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    (tmp_path / "nothing").mkdir()
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(tmp_path / "nothing")], "no .txt files"),
        (["--data", str(short)], "fewer than one window of 17"),
        (["--data", str(corpus), "--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--data", str(corpus), "--train-layers", "last:99"], "last:1 to last:2"),
        (["--data", str(corpus), "--context-length", "64"], "exceeds the model's context length 32"),
        (["--data", str(corpus), "--batch-size", "4096"], "fewer than one batch"),
        (["--data", str(corpus), "--val-ratio", "0.001"], "validation split"),
        (["--data", str(corpus), "--lr", "-1"], "--lr must be"),
    ]
    for i, (args, needle) in enumerate(cases):
        argv = ["train", "--model", str(model_dir), "--out", str(tmp_path / f"o{i}"), "--max-steps", "1", "--quiet"]
        assert main(argv + COMMON[:2] + ["--device", "cpu"] + args) == 1, args
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("gpt2load: error:") and needle in lines[0], (args, err)


def test_an_existing_run_needs_resume_and_errors_do_not_trace(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_cmd(model_dir, corpus, out, "--max-steps", "1", "--eval-every", "0")) == 0
    assert main(train_cmd(model_dir, corpus, out, "--max-steps", "1")) == 1
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert_clean_error(run(*train_cmd(model_dir, corpus, out, "--max-steps", "1")), "--resume")
