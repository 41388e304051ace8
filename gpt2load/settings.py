"""Settings: the one module that reads the environment.

Entry points (the CLI, `load_gpt2`, `download`, `serve`, training) call `Settings.from_env()` once, where a bad
value is an error naming its variable, and pass the object (or the part of it a stage needs) down. Nothing else
reads `os.environ`, so no hot path does and a test builds the settings it wants instead of patching variables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Gpt2LoadError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
MATMUL_KERNELS = ("plain", "onednn", "split", "native")


@dataclass(frozen=True)
class KernelSettings:
    """What the speed layer may use (validated here, each error naming the environment variable it comes from).

    matmul: GPT2LOAD_MATMUL, "auto" (measure every kernel per shape) or one of plain, onednn, split, native (forced
        where it works). onednn: GPT2LOAD_ONEDNN, "0" never uses oneDNN's private op, "1" always, "auto" measures.
    native: GPT2LOAD_NATIVE, "0" never builds or uses gpt2load's C kernels. attention: GPT2LOAD_ATTENTION, "sdpa"
        (torch's), "native" (attend.c's wherever it applies) or "auto". int8pack: GPT2LOAD_INT8PACK, False leaves
        torch's int8 kernel unused. block: GPT2LOAD_BLOCK, "0" never computes a decoding step's block in one call
        of gpt2load's block.c (its matmuls, attention and GELU then run one by one).
    """

    matmul: str = "auto"
    onednn: str = "auto"
    native: str = "auto"
    attention: str = "auto"
    int8pack: bool = True
    block: str = "auto"

    def __post_init__(self) -> None:
        for var, value, allowed in (
            ("GPT2LOAD_MATMUL", self.matmul, ("auto", *MATMUL_KERNELS)),
            ("GPT2LOAD_ONEDNN", self.onednn, ("0", "1", "auto")),
            ("GPT2LOAD_NATIVE", self.native, ("0", "auto")),
            ("GPT2LOAD_ATTENTION", self.attention, ("auto", "sdpa", "native")),
            ("GPT2LOAD_BLOCK", self.block, ("0", "auto")),
        ):
            if value not in allowed:
                raise Gpt2LoadError(f"{var}={value!r} is not one of {', '.join(allowed)}: set one of them, or unset it")
        forced = self.matmul
        if forced != "auto" and (
            (self.onednn == "0" and forced == "onednn") or (self.onednn == "1" and forced != "onednn")
        ):
            raise Gpt2LoadError(
                f"GPT2LOAD_MATMUL={forced} contradicts GPT2LOAD_ONEDNN={self.onednn}: unset one of them"
            )
        for var, value in (("GPT2LOAD_MATMUL", forced), ("GPT2LOAD_ATTENTION", self.attention)):
            if value == "native" and self.native == "0":
                raise Gpt2LoadError(f"{var}=native contradicts GPT2LOAD_NATIVE=0: unset one of them")

    @property
    def matmul_mode(self) -> str:
        """ "auto", "no-onednn" (measure all but oneDNN's op) or the forced kernel's name."""
        if self.matmul != "auto":
            return self.matmul
        return {"0": "no-onednn", "1": "onednn"}.get(self.onednn, "auto")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KernelSettings:
        env = os.environ if env is None else env

        def word(name: str) -> str:
            return env.get(name, "").strip().lower() or "auto"

        return cls(
            matmul=word("GPT2LOAD_MATMUL"),
            onednn=word("GPT2LOAD_ONEDNN"),
            native=word("GPT2LOAD_NATIVE"),
            attention=word("GPT2LOAD_ATTENTION"),
            int8pack=env.get("GPT2LOAD_INT8PACK", "1").strip() != "0",
            block=word("GPT2LOAD_BLOCK"),
        )


@dataclass(frozen=True)
class Settings:
    """Every environment variable gpt2load honours, read once."""

    kernels: KernelSettings = field(default_factory=KernelSettings)
    cache_dir: Path | None = None  # GPT2LOAD_CACHE_DIR: the conversion cache
    no_cache: bool = False  # GPT2LOAD_NO_CACHE
    xdg_cache_home: Path | None = None  # XDG_CACHE_HOME, when absolute (a relative one is ignored, as the spec says)
    weights_dir: Path | None = None  # GPT2LOAD_WEIGHTS_DIR
    cc: str = ""  # CC: the C compiler for gpt2load's kernels
    kernel_store: bool = True  # GPT2LOAD_KERNEL_CACHE=0: measured kernel choices are neither read nor kept
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # what the rest was read from

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings the environment (default: this process's) gives, every value checked."""
        env = dict(os.environ if env is None else env)
        return cls(
            kernels=KernelSettings.from_env(env),
            cache_dir=_path(env, "GPT2LOAD_CACHE_DIR"),
            no_cache=_flag(env, "GPT2LOAD_NO_CACHE"),
            xdg_cache_home=_path(env, "XDG_CACHE_HOME", absolute_only=True),
            weights_dir=_path(env, "GPT2LOAD_WEIGHTS_DIR"),
            cc=env.get("CC", "").strip(),
            kernel_store=_flag(env, "GPT2LOAD_KERNEL_CACHE", default=True),
            env=env,
        )

    def get(self, name: str, default: str | None = None) -> str | None:
        """A variable as it was when these settings were read (for the hub's and torchrun's own variables)."""
        return self.env.get(name, default)

    def flag(self, name: str) -> bool:
        return _flag(self.env, name)

    def number(self, name: str, default: float, minimum: float, whole: bool = False) -> float:
        """A numeric variable, or `default` when unset; an error naming it when it is not a number >= minimum."""
        raw = self.env.get(name, "").strip()
        if not raw:
            return default
        try:
            value = int(raw) if whole else float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum:
            kind = "whole number" if whole else "number"
            raise Gpt2LoadError(f"{name}={raw!r} is not a {kind} >= {minimum:g}: fix or unset it")
        return value

    def cache_home(self) -> Path:
        """$XDG_CACHE_HOME (when absolute), else ~/.cache."""
        return self.xdg_cache_home or Path.home() / ".cache"


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (any case); unset or empty is `default`."""
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Gpt2LoadError(f"{name}={env[name]!r} is not a yes/no value: set it to 1 or 0, or unset it")


def _path(env: Mapping[str, str], name: str, absolute_only: bool = False) -> Path | None:
    """A folder or file named by a variable (with ~ expanded), or None when it is unset or empty."""
    value = env.get(name, "")
    if not value.strip():
        return None
    path = Path(value).expanduser()
    if absolute_only and not path.is_absolute():
        return None
    return path.absolute()


__all__ = ["KernelSettings", "Settings"]
