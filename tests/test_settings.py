"""Settings are read in one place: only gpt2load/settings.py touches the environment; every value is checked
there with an error naming its variable, and entry points take a Settings object instead of the environment."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import TOKENIZER_DIR

from gpt2load import Gpt2LoadError, load_gpt2, save_model
from gpt2load.model.config import GPTConfig
from gpt2load.model.gpt import GPTModel
from gpt2load.settings import KernelSettings, Settings

PACKAGE = Path(__file__).parent.parent / "gpt2load"


def environment_reads(path: Path) -> list[int]:
    """Lines of `path` that name os.environ, os.getenv or os.putenv (as attribute or imported name)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "putenv", "environb"):
            hits.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name in ("environ", "getenv", "putenv", "environb") for a in node.names):
                hits.append(node.lineno)
    return hits


def test_only_the_settings_module_reads_the_environment():
    readers = {str(p.relative_to(PACKAGE)): environment_reads(p) for p in sorted(PACKAGE.rglob("*.py"))}
    readers = {p: lines for p, lines in readers.items() if lines}
    assert list(readers) == ["settings.py"], readers


def test_the_scan_would_see_a_reader(tmp_path):
    (tmp_path / "m.py").write_text("import os\nfrom os import getenv\nx = os.environ.get('A')\n")
    assert environment_reads(tmp_path / "m.py") == [2, 3]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"GPT2LOAD_MATMUL": "fastest"}, "GPT2LOAD_MATMUL='fastest'"),
        ({"GPT2LOAD_NO_CACHE": "maybe"}, "GPT2LOAD_NO_CACHE='maybe'"),
        ({"GPT2LOAD_ATTENTION": "native", "GPT2LOAD_NATIVE": "0"}, "GPT2LOAD_ATTENTION=native contradicts"),
    ],
)
def test_a_bad_value_is_one_error_naming_its_variable(env, named):
    with pytest.raises(Gpt2LoadError, match=named):
        Settings.from_env(env)


def test_numbers_are_checked_when_asked_for():
    s = Settings.from_env({"GPT2LOAD_MAX_RETRIES": "-1", "WORLD_SIZE": "2"})
    assert s.number("WORLD_SIZE", 1, 1, whole=True) == 2 and s.number("UNSET", 7, 0) == 7
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_MAX_RETRIES='-1' is not a whole number >= 0"):
        s.number("GPT2LOAD_MAX_RETRIES", 8, 0, whole=True)


def test_a_relative_cache_home_is_ignored_and_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings.from_env({"XDG_CACHE_HOME": "rel/cache"}).cache_home() == tmp_path / ".cache"
    assert Settings.from_env({"XDG_CACHE_HOME": "~/c"}).cache_home() == tmp_path / "c"
    assert Settings.from_env({"GPT2LOAD_CACHE_DIR": "~/conv"}).cache_dir == tmp_path / "conv"


def test_load_gpt2_takes_its_settings_from_the_caller(tmp_path, monkeypatch):
    save_model(
        GPTModel(GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1)),
        tmp_path / "m",
        TOKENIZER_DIR,
    )
    monkeypatch.setenv("GPT2LOAD_MATMUL", "not-a-kernel")  # the environment is not read when settings are given
    given = Settings(kernels=KernelSettings(matmul="plain"))
    model = load_gpt2(tmp_path / "m", device="cpu", settings=given)
    assert model.trf_blocks[0].att.backend.kernels.settings == given.kernels
    with pytest.raises(Gpt2LoadError, match="GPT2LOAD_MATMUL='not-a-kernel'"):
        load_gpt2(tmp_path / "m", device="cpu")  # read at the call: a bad value fails here, naming it
