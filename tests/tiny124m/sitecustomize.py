"""Start-up hook for test subprocesses: the local test server serves the tiny OpenAI fixture as "124M".

A subprocess whose PYTHONPATH starts with this folder (hubserver.tiny_as_124m_env()) expects tiny's
hparams.json for 124M, as the in-process tests do with monkeypatch; nothing else changes.
"""

from pathlib import Path

from gpt2load.hub import sources
from gpt2load.model.config import read_hparams

_TINY = Path(__file__).resolve().parents[1] / "fixtures" / "openai-tiny" / "hparams.json"
sources.OPENAI_HPARAMS["124M"] = read_hparams(_TINY)
