"""gpt2load must never import TensorFlow (the book's most reported install problem)."""

import subprocess
import sys
from pathlib import Path

from helpers import OPENAI_TINY

PACKAGE = Path(__file__).parent.parent / "gpt2load"


def test_import_and_openai_load_pull_in_no_tensorflow(tmp_path):
    code = (
        "import shutil, sys, gpt2load, gpt2load.cli.main, gpt2load.formats.tfcheckpoint, gpt2load.load\n"
        f"shutil.copytree({str(OPENAI_TINY)!r}, {str(tmp_path / 'm')!r})\n"
        f"gpt2load.load_gpt2({str(tmp_path / 'm')!r}, device='cpu')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorboard', 'keras'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_mentions_a_tensorflow_import():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "import tensorflow" not in text and "from tensorflow" not in text, path
