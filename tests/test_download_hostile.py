"""Hostile and mistaken servers and settings, through the CLI as a user runs it (`python -m gpt2load download`).

Every case: exit 1, one `gpt2load: error:` line and no traceback, nothing recorded as verified that is not,
bounded attempts (backoff set small; a server that never gives up must not keep us), no lock file left behind.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import OPENAI_TINY, TOKENIZER_DIR, assert_clean_error, run_cli
from hubserver import HTML, Fault, Hub, fake_safetensors, tiny_as_124m_env

from gpt2load.model.config import PRESETS, hf_config_dict

# The on-disk contract, spelled out (not imported) so that these tests also run against older code.
LOCK, MANIFEST = ".gpt2load.lock", ".gpt2load-download.json"
OPENAI_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
    "model.ckpt.data-00000-of-00001",
)
MAX_BYTES = {"checkpoint": 65_536}  # sources.MAX_BYTES

REPO = "openai-community/gpt2"
MAX_RETRIES = 3
TINY = {n: (OPENAI_TINY / n).read_bytes() for n in OPENAI_FILES if (OPENAI_TINY / n).exists()}
TINY.update({n: (TOKENIZER_DIR / n).read_bytes() for n in ("encoder.json", "vocab.bpe")})
# What OpenAI's real 124M hparams.json says; the tiny index and data then do not belong to it.
HPARAMS_124M = json.dumps(
    dict(zip(("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"), PRESETS["124M"].to_dict().values(), strict=False))
).encode()
HF = {
    "config.json": json.dumps(hf_config_dict(PRESETS["124M"])).encode(),
    "vocab.json": TINY["encoder.json"],
    "merges.txt": TINY["vocab.bpe"],
    "model.safetensors": fake_safetensors(b"\0" * 4096),
}


def oa(name: str) -> str:
    return f"gpt-2/models/124M/{name}"


@dataclass
class Case:
    source: str
    needles: tuple[str, ...]  # in the error line
    mode: str | None = None  # Hub(mode=...)
    files: dict[str, bytes] = field(default_factory=dict)  # replaces served OpenAI files
    faults: dict[str, Fault] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # "{hub}" is replaced by the hub's address
    bad: str = ""  # the first hostile file: only files before it may be recorded (all, with a mode or env)
    tiny: bool = False  # accept the tiny fixture as 124M (to reach the files after the index)
    max_requests: int = 2 * (MAX_RETRIES + 2)  # to the server, in all
    retries: int = 0  # retry lines expected on stderr


CASES = {
    "hf-html-for-everything": Case("hf", ("gave no sha256 or git etag for config.json", "HF_ENDPOINT"), mode="html"),
    "openai-html-for-everything": Case("openai", ("checkpoint downloaded from", "is corrupt"), mode="html"),
    "openai-hparams-of-another-size": Case(
        "openai", ("hparams.json", "describes another model than 124M"), bad="hparams.json"
    ),
    "openai-hparams-content-length-short": Case(
        "openai",
        ("hparams.json", "is corrupt", "not valid JSON"),
        files={"hparams.json": HPARAMS_124M},
        faults={oa("hparams.json"): Fault(content_length=len(HPARAMS_124M) - 20)},
        bad="hparams.json",
    ),
    "openai-index-not-of-hparams": Case(
        "openai",
        ("model.ckpt.index", "tensors differ from hparams.json"),
        files={"hparams.json": HPARAMS_124M},
        bad="model.ckpt.index",
    ),
    "openai-index-is-html": Case(
        "openai",
        ("model.ckpt.index", "bad footer"),
        files={"model.ckpt.index": HTML},
        tiny=True,
        bad="model.ckpt.index",
    ),
    "openai-meta-is-html": Case(
        "openai", ("model.ckpt.meta", "MetaGraphDef"), files={"model.ckpt.meta": HTML}, tiny=True, bad="model.ckpt.meta"
    ),
    "openai-checkpoint-too-big": Case(
        "openai",
        ("checkpoint", "more than checkpoint can have"),
        files={"checkpoint": b"#" * (MAX_BYTES["checkpoint"] + 1)},
        bad="checkpoint",
    ),
    "openai-checkpoint-endless-without-length": Case(
        "openai",
        ("checkpoint", "sent more than the 65,536 bytes"),
        files={"checkpoint": b"#" * (8 * MAX_BYTES["checkpoint"])},
        faults={oa("checkpoint"): Fault(content_length=-1)},
        bad="checkpoint",
    ),
    "openai-range-ignored-cut-at-same-byte": Case(
        "openai",
        ("encoder.json: giving up", f"after {MAX_RETRIES} retries"),
        faults={oa("encoder.json"): Fault(cut_after=300_000, cuts=10**6, ignore_range=True)},
        retries=MAX_RETRIES,
        bad="encoder.json",
    ),
    "openai-503-forever": Case(
        "openai",
        ("checkpoint: giving up", "HTTP 503"),
        faults={oa("checkpoint"): Fault(fail_first=10**6)},
        retries=MAX_RETRIES,
        bad="checkpoint",
    ),
    "hf-redirect-loop": Case("hf", ("redirects in a loop",), mode="redirect_loop", max_requests=12),
    "openai-redirect-loop": Case("openai", ("redirects in a loop",), mode="redirect_loop", max_requests=31),
    "hf-endpoint-malformed": Case(
        "hf", ("HF_ENDPOINT='http://[::1'", "not a usable URL"), env={"HF_ENDPOINT": "http://[::1"}
    ),
    "hf-endpoint-bad-scheme": Case("hf", ("HF_ENDPOINT='ftp://127.0.0.1'",), env={"HF_ENDPOINT": "ftp://127.0.0.1"}),
    "openai-url-bad-scheme": Case(
        "openai", ("GPT2LOAD_OPENAI_URL='file:///etc'",), env={"GPT2LOAD_OPENAI_URL": "file:///etc"}
    ),
    "retry-base-nan": Case(
        "openai", ("GPT2LOAD_RETRY_BASE_SECONDS='nan'",), env={"GPT2LOAD_RETRY_BASE_SECONDS": "nan"}
    ),
    "max-retries-not-a-number": Case("hf", ("GPT2LOAD_MAX_RETRIES='many'",), env={"GPT2LOAD_MAX_RETRIES": "many"}),
    "read-timeout-negative": Case("hf", ("GPT2LOAD_READ_TIMEOUT='-1'",), env={"GPT2LOAD_READ_TIMEOUT": "-1"}),
    "dns-failure": Case(
        "hf",
        ("cannot resolve host nonexistent.invalid", "after 2 retries"),
        env={"HF_ENDPOINT": "http://nonexistent.invalid", "GPT2LOAD_MAX_RETRIES": "8"},
        retries=2,
    ),
}


def recorded(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return {}


def good_prefix(case: Case) -> set[str]:
    """The files that may be recorded: those served intact before the hostile one."""
    if not case.bad:
        return set()
    names = OPENAI_FILES if case.source == "openai" else tuple(HF)
    return set(names[: names.index(case.bad)])


@pytest.mark.parametrize("name", CASES)
def test_hostile_download_fails_cleanly(name, tmp_path):
    case = CASES[name]
    with Hub(mode=case.mode) as hub:
        hub.add_openai("124M", {**TINY, **case.files})
        hub.add_hf(REPO, HF)
        hub.faults.update(case.faults)
        env = {
            "HF_ENDPOINT": hub.endpoint,
            "GPT2LOAD_OPENAI_URL": hub.openai_url,
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
            "GPT2LOAD_RETRY_BASE_SECONDS": "0.01",
            "GPT2LOAD_RETRY_MAX_SECONDS": "0.05",
            "GPT2LOAD_MAX_RETRIES": str(MAX_RETRIES),
            "GPT2LOAD_READ_TIMEOUT": "10",
            **(tiny_as_124m_env() if case.tiny else {}),
            **case.env,
        }
        proc = run_cli(
            "download", "124M", "--source", case.source, "--weights-dir", str(tmp_path / "w"), env=env, timeout=90
        )
        n_requests = len(hub.requests)
    assert_clean_error(proc, *case.needles)
    if not case.retries:
        assert len(proc.stderr.splitlines()) == 1, proc.stderr  # the error line and nothing else
    assert len([ln for ln in proc.stderr.splitlines() if "; retry " in ln]) == case.retries, proc.stderr
    assert n_requests <= case.max_requests
    folder = tmp_path / "w" / case.source / "124M"
    allowed = good_prefix(case)
    assert set(recorded(folder)) <= allowed
    if folder.exists():
        finals = {
            p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith((".part", ".json"))
        }
        assert finals <= allowed | {"hparams.json", "config.json", "vocab.json"} & allowed
        assert not (folder / LOCK).exists()


def test_tls_certificate_error_fails_at_once(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with Hub(tls=(cert, key)) as hub:
        hub.add_hf(REPO, HF)
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "c"), "GPT2LOAD_RETRY_BASE_SECONDS": "0.01"}
        proc = run_cli("download", "124M", "--weights-dir", str(tmp_path / "w"), env=env, timeout=90)
    assert_clean_error(proc, "TLS failed for config.json", "CERTIFICATE_VERIFY_FAILED")
    assert "; retry " not in proc.stderr  # a certificate does not get better by asking again
    assert not (tmp_path / "w" / "hf" / "124M" / LOCK).exists()


def test_bad_environment_does_not_break_help():
    proc = run_cli("--help", env={"GPT2LOAD_MAX_RETRIES": "many", "GPT2LOAD_RETRY_BASE_SECONDS": "x"})
    assert proc.returncode == 0 and "download" in proc.stdout, proc.stderr


def test_success_says_each_retry_cleans_stale_temp_files_and_leaves_no_lock(tmp_path):
    folder = tmp_path / "w" / "hf" / "124M"
    folder.mkdir(parents=True)
    stale = [".gpt2load-download.json.4242.tmp", "config.json.part.json.4243.tmp", ".verify-abc"]
    for name in stale[:2]:
        (folder / name).write_text("left by kill -9")
    (folder / stale[2]).mkdir()
    mine = folder / "notes.tmp"  # not of our naming: kept
    mine.write_text("mine")
    with Hub() as hub:
        hub.add_hf(REPO, HF)
        hub.faults[f"{REPO}/vocab.json"] = Fault(fail_first=2)
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "c"), "GPT2LOAD_RETRY_BASE_SECONDS": "0.01"}
        proc = run_cli("download", "124M", "--weights-dir", str(tmp_path / "w"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "gpt2load: vocab.json: HTTP 503; retry 1 of 8 in 0.01 s",
        "gpt2load: vocab.json: HTTP 503; retry 2 of 8 in 0.02 s",
    ]
    assert not [n for n in stale if (folder / n).exists()] and mine.exists()
    assert not (folder / LOCK).exists()
    assert set(recorded(folder)) == set(HF)
    assert all(e["verified_by"] for e in recorded(folder).values())
