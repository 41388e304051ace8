"""Environment variables, read when they are used (never at import) and validated with an error naming them."""

from __future__ import annotations

import os
from pathlib import Path

from gpt2load.errors import Gpt2LoadError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty is no."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Gpt2LoadError(f"{name}={os.environ[name]!r} is not a yes/no value: set it to 1 or 0, or unset it")


def env_path(name: str) -> Path | None:
    """A folder or file named by a variable (with ~ expanded), or None when it is unset or empty."""
    value = os.environ.get(name, "")
    return Path(value).expanduser().absolute() if value.strip() else None
