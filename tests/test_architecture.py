"""The top-level folders are the architecture: each room may import only the rooms below it
(docs/architecture.md, "Import rules"). Every import is checked, top level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> (its import name, the rooms it may import besides itself)
ROOMS = {
    "mzoo": ("mzoo", set()),
    "models": ("mzoo.models", {"mzoo"}),
    "zoo": ("mzoo.zoo", {"mzoo"}),
    "converters": ("mzoo.converters", {"mzoo", "models"}),
    "jobs": ("mzoo.jobs", {"mzoo", "models", "converters", "zoo"}),
    "cli": ("mzoo.cli", {"mzoo", "zoo", "jobs"}),
}
# cli modules that are plumbing for the command modules (console, shared options, progress, run output)
CLI_PLUMBING = {"mzoo.cli.common", "mzoo.cli.options", "mzoo.cli.progress", "mzoo.cli.running"}
MAX_LINES = 500


def room_of(module: str) -> str | None:
    """The room an absolute `mzoo...` import lands in (the longest matching package)."""
    if module != "mzoo" and not module.startswith("mzoo."):
        return None
    best = None
    for room, (name, _) in ROOMS.items():
        if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(ROOMS[best][0])):
            best = room
    return best


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module in ("mzoo", "mzoo.cli"):  # `from mzoo import zoo`, `from mzoo.cli import train`
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def product_files(room: str) -> list[Path]:
    return sorted(p for p in (ROOT / room).rglob("*.py"))


@pytest.mark.parametrize("room", list(ROOMS))
def test_each_room_imports_only_the_rooms_below_it(room):
    allowed = ROOMS[room][1] | {room}
    wrong = []
    for path in product_files(room):
        for line, module in imports(path):
            target = room_of(module)
            if target is not None and target not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({room} -> {target})")
    assert not wrong, "\n".join(wrong)


def test_cli_modules_do_not_use_each_other_for_logic():
    """A command module parses, calls one job and prints; it may use the CLI's plumbing, never
    another command module (cli/main.py registers them all)."""
    wrong = []
    for path in product_files("cli"):
        if path.name in ("main.py", "__init__.py") or f"mzoo.cli.{path.stem}" in CLI_PLUMBING:
            continue
        for line, module in imports(path):
            if module.startswith("mzoo.cli.") and module not in CLI_PLUMBING:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_product_files_stay_short_or_say_why():
    """A file over ~500 lines does several jobs, unless its docstring says why it must not be split."""
    long = []
    for room in ROOMS:
        for path in product_files(room):
            text = path.read_text()
            n = text.count("\n")
            doc = ast.get_docstring(ast.parse(text)) or ""
            if n > MAX_LINES and "one file because" not in doc:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "\n".join(long)


def test_the_rules_are_the_documented_ones():
    """docs/architecture.md states the same table this test enforces."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for room, (_, below) in ROOMS.items():
        line = f"| `{room}/` |"
        assert line in doc, f"docs/architecture.md has no import-rule row for {room}/"
        row = next(r for r in doc.splitlines() if r.startswith(line))
        for other in ROOMS:
            if other != room:
                assert (f"`{other}/`" in row.split("|")[2]) == (other in below), (room, other, row)


def test_every_package_is_installed():
    """pyproject lists every package folder of every room (an editable install finds a forgotten one
    anyway; a wheel would not)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: Path(path) for name, path in project["package-dir"].items()}
    found = set()
    for room, (name, _) in ROOMS.items():
        for init in (ROOT / room).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / room)
            found.add(".".join([name, *rel.parts]))
    assert found == set(project["packages"]), found ^ set(project["packages"])
    assert all((ROOT / folders[name]).is_dir() for name in folders)


def test_the_cli_starts_without_the_engine():
    """`mzoo --help`, a typo or a bad flag answers in a fraction of a second: the command modules load
    their jobs (and so torch, transformers, numpy) only when a command runs."""
    import subprocess
    import sys

    code = ("import sys, mzoo.cli.main; "
            "print(','.join(m for m in ('torch', 'transformers', 'numpy', 'safetensors', 'mzoo.jobs') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "", f"importing the CLI loads {out.strip()}"
