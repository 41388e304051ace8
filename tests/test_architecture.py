"""The shape of the package holds: the model imports nothing from the speed layer, no stage reaches into a later
one, no import cycles between modules, and a handful of modules at the top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "gpt2load"


def imports(path: Path) -> set[str]:
    """The gpt2load modules `path` imports (relative imports resolved), at any depth of the file."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module.split(".")[0] != "gpt2load":
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from . import native` names a module
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "gpt2load")
    return found


def modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def test_the_model_imports_nothing_from_the_speed_layer():
    for p in (PACKAGE / "model").glob("*.py"):
        fast = sorted(m for m in imports(p) if m.startswith("gpt2load.fast"))
        assert not fast, (p.name, fast)


def test_no_stage_reaches_into_a_later_one():
    order = ["settings", "errors", "fsutil", "model", "fast", "hub", "formats", "tokenizer", "generation"]
    later = {"load", "tensors", "info", "training", "finetune", "serve", "cli"}
    for name, p in modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in order:  # a stage's own subpackage
            continue
        reached = {m.split(".")[1] for m in imports(p) if len(m.split(".")) > 1} & later
        assert not reached, (name, sorted(reached))


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {n: {m for m in imports(p) if m in mods and m != n} for n, p in mods.items()}
    for n in graph:  # a package's __init__ re-exporting its own modules is not a cycle
        graph[n] = {m for m in graph[n] if not (n == m.rsplit(".", 1)[0] or m == n.rsplit(".", 1)[0])}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            assert state.get(m) != 1, " -> ".join([*path, n, m])
            if m not in state:
                visit(m, [*path, n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_a_handful_of_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 15, top
    assert (PACKAGE / "fast" / "csrc").is_dir() and not list(PACKAGE.glob("*.c"))
