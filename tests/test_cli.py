"""The command line as a user runs it: subprocesses, real files, a real local server for downloads."""

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import OPENAI_TINY, TOKENIZER_DIR, add_tokenizer, assert_clean_error, copy_fixture, run_cli
from hubserver import Hub, tiny_as_124m_env
from oracle import pair
from transformers import GPT2LMHeadModel

from gpt2load.load import load_gpt2
from gpt2load.tokenizer import encode, tokenizer_from_folder


@pytest.fixture
def tiny(tmp_path):
    """The TensorFlow-written OpenAI fixture with the real tokenizer files beside it (vocab 96: ASCII prompts)."""
    return add_tokenizer(copy_fixture("openai-tiny", tmp_path))


def test_help_for_every_command():
    for args in [[], ["generate"], ["convert"], ["info"], ["download"], ["train"]]:
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "usage: gpt2load" in proc.stdout


def test_generate_json_shape_and_greedy_tokens(tiny):
    proc = run_cli(
        "generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z", "--max-new-tokens", "7", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    enc = tokenizer_from_folder(TOKENIZER_DIR)
    assert out["prompt_ids"] == encode(enc, "A(Z")
    [c] = out["completions"]
    assert set(c) == {"token_ids", "text", "score"} and c["score"] is None
    # The same greedy tokens as a plain argmax loop over the loaded model.
    model = load_gpt2(tiny, device="cpu")
    idx = torch.tensor([out["prompt_ids"]])
    with torch.no_grad():
        for _ in range(7):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], 1)
    assert c["token_ids"] == idx[0, 3:].tolist()
    assert c["text"] == enc.decode(c["token_ids"])


def test_generate_streams_prompt_then_text(tiny):
    proc = run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    as_json = json.loads(
        run_cli(
            "generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z", "--max-new-tokens", "5", "--json"
        ).stdout
    )
    assert proc.stdout == "A(Z" + as_json["completions"][0]["text"] + "\n"


def test_beam_search_json_has_scores(tiny):
    proc = run_cli(
        "generate",
        "--device",
        "cpu",
        "--model",
        str(tiny),
        "--prompt",
        "A(Z",
        "--max-new-tokens",
        "4",
        "--num-beams",
        "3",
        "--num-return-sequences",
        "2",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    comps = json.loads(proc.stdout)["completions"]
    assert len(comps) == 2 and all(isinstance(c["score"], float) for c in comps)
    assert comps[0]["score"] >= comps[1]["score"]


def test_long_prompt_keeps_its_end_with_a_notice(tiny):
    proc = run_cli(
        "generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A;B;" * 12, "--max-new-tokens", "2", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert "notice" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-k", "0"], "top_k"),
        (["--top-p", "1.5"], "top_p"),
        (["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
        (["--device", "tpu"], "device"),
        (["--max-new-tokens", "-3"], "max-new-tokens"),  # refused by the parser, before loading
    ],
)
def test_invalid_generation_arguments(tiny, flags, needle):
    proc = run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z", *flags)
    assert_clean_error(proc, needle)


def test_prompt_outside_a_small_vocabulary_is_refused(tiny):
    assert_clean_error(run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "Hello world"), "vocab")


def test_unknown_model_lists_the_valid_names(tmp_path):
    proc = run_cli("generate", "--device", "cpu", "--model", "gpt5", "--prompt", "x", "--weights-dir", str(tmp_path))
    assert_clean_error(proc, "unknown model 'gpt5'", "124M", "gpt2-xl")


def test_missing_truncated_and_corrupt_files(tiny):
    data = tiny / "model.ckpt.data-00000-of-00001"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    assert_clean_error(
        run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z"), "truncated", data.name
    )
    flipped = bytearray(raw)
    flipped[100] ^= 0x10
    data.write_bytes(bytes(flipped))
    assert_clean_error(
        run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z"), "CRC32C", "model/"
    )
    data.unlink()
    assert_clean_error(run_cli("generate", "--device", "cpu", "--model", str(tiny), "--prompt", "A(Z"), "missing")
    (tiny / "hparams.json").write_text("{not json")
    assert_clean_error(run_cli("info", str(tiny)), "hparams.json")


def test_convert_all_formats_and_failure_keeps_old_output(tiny, tmp_path):
    ref = load_gpt2(tiny, device="cpu")
    x = torch.tensor([[1, 2, 3, 4]])
    for to, out in [("hf", tmp_path / "hf"), ("pth", tmp_path / "m.pth"), ("safetensors", tmp_path / "m.safetensors")]:
        proc = run_cli("convert", "--model", str(tiny), "--to", to, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ref(x), rtol=1e-5, atol=1e-5)  # two implementations: never atol=0
        torch.testing.assert_close(load_gpt2(tmp_path / "m.safetensors", device="cpu")(x), ref(x), rtol=0, atol=0)
    assert (tmp_path / "hf" / "vocab.json").is_file()
    # A conversion that fails leaves an existing output as it was.
    before = (tmp_path / "m.pth").read_bytes()
    (tiny / "model.ckpt.data-00000-of-00001").write_bytes(b"")
    again = run_cli("convert", "--model", str(tiny), "--to", "pth", "--out", str(tmp_path / "m.pth"), "--force")
    assert_clean_error(again, "model.ckpt.data")
    assert (tmp_path / "m.pth").read_bytes() == before


def test_info(tiny):
    proc = run_cli("info", str(tiny), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n_layers"] == 2
    proc = run_cli("info", "gpt2-medium")
    assert "355M" in proc.stdout and "354,823,168" in proc.stdout


def _served_hf_model(tmp_path):
    hf, _ = pair()
    hf.save_pretrained(tmp_path / "served")
    add_tokenizer(tmp_path / "served", ("vocab.json", "merges.txt"))
    return {p.name: p.read_bytes() for p in (tmp_path / "served").iterdir() if p.is_file()}


@pytest.mark.parametrize("source", ["openai", "hf"])
def test_generate_downloads_end_to_end_from_a_local_server(tmp_path, source):
    """`gpt2load generate --model 124M --source S` against a real local server standing in for OpenAI/the hub."""
    openai_files = {p.name: p.read_bytes() for p in OPENAI_TINY.iterdir() if p.name != "expected.npz"}
    openai_files.update({n: (TOKENIZER_DIR / n).read_bytes() for n in ("encoder.json", "vocab.bpe")})
    with Hub() as hub:
        hub.add_openai("124M", openai_files)
        hub.add_hf("openai-community/gpt2", _served_hf_model(tmp_path))
        env = {
            "GPT2LOAD_OPENAI_URL": hub.openai_url,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_CACHE": str(tmp_path / "c"),
            "GPT2LOAD_WEIGHTS_DIR": str(tmp_path / "w"),
            **tiny_as_124m_env(),  # the tiny OpenAI fixture is served as "124M"
        }
        args = (
            "generate",
            "--device",
            "cpu",
            "--model",
            "124M",
            "--source",
            source,
            "--prompt",
            "A(Z",
            "--max-new-tokens",
            "5",
            "--json",
        )
        first = run_cli(*args, env=env)
        assert first.returncode == 0, first.stderr
        sent = sum(hub.sent.values())
        second = run_cli(*args, env=env)
        assert second.returncode == 0, second.stderr
        assert sum(hub.sent.values()) == sent  # the second run downloads nothing
    assert json.loads(first.stdout) == json.loads(second.stdout)
    assert len(json.loads(first.stdout)["completions"][0]["token_ids"]) == 5
    folder = tmp_path / "w" / source / "124M"
    assert len(list(Path(os.environ["GPT2LOAD_CACHE_DIR"]).glob("124M-*/gpt2load.safetensors"))) >= 1  # cached
    assert not (folder / "gpt2load.safetensors").exists()  # never beside the download
    assert not [p for p in os.listdir(folder) if p.endswith(".part")]
