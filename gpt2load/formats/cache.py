"""The conversion cache: an OpenAI or Hugging Face source converted once into gpt2load's own form, in gpt2load's
own cache folder, keyed by the source and checked against its fingerprint."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from ..errors import Gpt2LoadError
from ..settings import Settings
from .layouts import OwnSource, Source
from .ownform import CACHE_NAME, write_own


def fingerprint(paths: list[Path]) -> str:
    """A cheap identity of the source files (name, size, mtime): the cache is stale when it changes."""
    return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths])


def cache_dir(settings: Settings | None = None) -> Path:
    """gpt2load's own folder for converted weights: $GPT2LOAD_CACHE_DIR, else $XDG_CACHE_HOME/gpt2load/converted,
    else ~/.cache/gpt2load/converted."""
    settings = settings or Settings.from_env()
    return settings.cache_dir or settings.cache_home() / "gpt2load" / "converted"


def cache_file(src: Source, settings: Settings | None = None) -> Path:
    """Where the conversion of `src` is cached: one entry per source, named by a hash of its resolved path
    (so a re-downloaded source replaces its entry instead of leaving a stale one); the file's metadata holds
    the source fingerprint, which decides whether the entry is still good."""
    key = hashlib.sha256(str(src.path.resolve()).encode()).hexdigest()[:20]
    return cache_dir(settings) / f"{src.folder.name}-{key}" / CACHE_NAME


def cache_wanted(cache: bool | None, settings: Settings | None = None) -> bool:
    """cache=False turns the conversion cache off, as does GPT2LOAD_NO_CACHE=1 when cache is None."""
    return cache if cache is not None else not (settings or Settings.from_env()).no_cache


def cached_source(
    src: Source, quiet: bool = True, cache: bool | None = None, settings: Settings | None = None
) -> Source:
    """For OpenAI/HF sources: their conversion in gpt2load's cache folder, made on first use; else src itself.

    Nothing is ever written beside the source (a Hugging Face cache snapshot, a book download, a read-only
    mount): only into `cache_dir()`. If that cannot be written, or the cache is off, conversion runs in memory.
    """
    if not src.cacheable or not cache_wanted(cache, settings):
        return src
    cached = cache_file(src, settings)
    stamp = fingerprint(src.inputs())
    if cached.is_file():
        try:
            hit = OwnSource.from_file(cached, src.folder)
            if hit.metadata().get("source") == stamp:
                return hit
        except Gpt2LoadError:
            pass  # a damaged cache is simply rebuilt
    bar = _progress_bar(src.cfg.n_params * 4, f"converting {src.folder.name}", quiet)
    try:
        meta = {"source": stamp, "source_kind": src.kind}
        # The cache keeps the source's dtype: a bfloat16 checkpoint loads as bfloat16 unless dtype= says otherwise.
        progress = bar.update if bar else None
        write_own(cached, src.cfg, src.tensors(), meta, progress, src.head(), src.dtype())
    except OSError as e:  # disk full, quota, read-only home: the cache is an optimisation, the load goes on
        warnings.warn(
            f"could not cache the conversion in {cached} ({e.strerror or e}); converting in memory "
            "(set GPT2LOAD_CACHE_DIR to a writable folder, or GPT2LOAD_NO_CACHE=1)",
            stacklevel=2,
        )
        return src
    finally:
        if bar:
            bar.close()
    return OwnSource(cached, src.cfg, src.folder)


def _progress_bar(total: int, desc: str, quiet: bool):
    import sys

    if quiet or not sys.stderr.isatty() or total < 200_000_000:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
