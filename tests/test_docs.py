"""The README and docs/ stay true to the tree: links reach their files and headings, the module map in
docs/architecture.md lists exactly the modules under gpt2load/, the README stays a front door, and no page
reads like a run log."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "gpt2load"
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0"
    ' && .venv/bin/pip install -q -e ".[test,gguf-check]" && .venv/bin/python -m pytest'
)

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)
MAP_ENTRY = re.compile(r"^- `([^`]+)`:", re.M)
CODE_PATH = re.compile(r"`([\w./-]+\.(?:py|c|h))`")
# Files named in the docs that are not in this repository on purpose.
NOT_OURS = {"gpt_download.py"}


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces
    to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_docs_exist():
    names = {p.name for p in PAGES}
    assert {"architecture.md", "speed.md", "serving.md", "training.md", "formats.md", "downloads.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def modules() -> set[str]:
    """Every module and C source of the package, as the map names them (relative to gpt2load/)."""
    found = {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.stem not in ("__init__", "__main__") and "__pycache__" not in p.parts
    }
    found |= {p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "fast" / "csrc").glob("*.[ch]")}
    return found


def module_map() -> list[str]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## The module map", 1)[1].split("\n## ", 1)[0]
    return MAP_ENTRY.findall(section)


def test_the_module_map_lists_every_module_and_only_modules_that_exist():
    entries = module_map()
    assert len(entries) == len(set(entries)), "a module is listed twice in docs/architecture.md"
    missing = sorted(modules() - set(entries))
    assert not missing, f"docs/architecture.md's module map does not list {missing}: add a line for each"
    gone = sorted(e for e in entries if not (PACKAGE / e).exists())
    assert not gone, f"docs/architecture.md's module map lists {gone}, which are not under gpt2load/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_source_file_named_exists(page):
    """A path such as `gpt2load/fast/native.py` or `formats/names.py` must exist (from the repository or from
    gpt2load/); a bare name such as `gemv.c` must be some file of the repository's."""
    ours = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    stale = []
    for name in set(CODE_PATH.findall(page.read_text(encoding="utf-8"))) - NOT_OURS:
        if "/" in name:
            if not ((ROOT / name).exists() or (PACKAGE / name).exists()):
                stale.append(name)
        elif name not in ours:
            stale.append(name)
    assert not stale, f"{page.name} names files that do not exist: {sorted(stale)}"


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert TEST_COMMAND in lines, "the README's test command changed: .ci/run runs it verbatim"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert TEST_COMMAND in ci, ".ci/run no longer runs the README's test command verbatim"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_run_logs(page):
    """Numbers carry their command, CPU and commit; words like 'today' date nothing once committed."""
    words = re.findall(
        r"\b(this session|today|yesterday|the run before it|in brackets)\b", page.read_text(encoding="utf-8"), re.I
    )
    assert not words, f"{page.name} reads like a run log: {sorted(set(words))}"
