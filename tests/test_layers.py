"""The package's layering, read from its source with ``ast`` so that it cannot silently come back.

- ``models/`` holds the model: none of its modules imports from ``infer/`` (the training layer above it).
- Only ``cli/`` speaks click.
- Only ``cli/`` and ``config/`` (the command-line vocabulary the library's messages use) name a
  command-line flag (``--name``) in a string the code produces; docstrings and comments may mention them.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bayes_spi"

#: a command-line flag: ``--`` then a lower-case word, not inside a longer token
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b")

#: modules another engineer is changing right now; their flag strings move to config/ with that change
PENDING_FLAGS: frozenset[str] = frozenset()


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        yield rel, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(tree: ast.Module, rel: str) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import anywhere in the module (relative imports resolved)."""
    package = ["bayes_spi", *rel.split("/")[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # ``from bayes_spi import infer``
                yield node.lineno, f"{name}.{alias.name}"


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, text)`` of every string constant that is not a docstring (f-string pieces included)."""
    docs = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


MODULES = list(_modules())


def test_the_source_is_found() -> None:
    names = {rel for rel, _ in MODULES}
    assert {"models/spi.py", "cli/fit.py", "so3.py"} <= names


def test_models_do_not_import_infer() -> None:
    bad = [f"models/{rel.split('/', 1)[1]}:{line} imports {name}"
           for rel, tree in MODULES if rel.startswith("models/")
           for line, name in _imported(tree, rel) if name == "bayes_spi.infer" or name.startswith("bayes_spi.infer.")]
    assert not bad, "models/ must not import from infer/:\n" + "\n".join(bad)


def test_only_the_cli_imports_click() -> None:
    bad = [f"{rel}:{line} imports {name}" for rel, tree in MODULES if not rel.startswith("cli/")
           for line, name in _imported(tree, rel) if name == "click" or name.startswith("click.")]
    assert not bad, "click belongs to cli/:\n" + "\n".join(bad)


def test_only_the_cli_and_config_name_flags() -> None:
    bad = [f"{rel}:{line}: {FLAG.search(text).group(0)} in {text.strip()[:80]!r}"
           for rel, tree in MODULES
           if not rel.startswith(("cli/", "config/")) and rel not in PENDING_FLAGS
           for line, text in _strings(tree) if FLAG.search(text)]
    assert not bad, "command-line flags belong to cli/ or config/:\n" + "\n".join(bad)


@pytest.mark.parametrize("text, found", [
    ("give --truth DATA.h5", True), ("lower --mean-photons", True), ("`fit -o RUN --resume`", True),
    ("a -- b", False), ("x---y", False), ("--", False), ("100--200", False), ("rate per pixel", False),
])
def test_the_flag_pattern(text: str, found: bool) -> None:
    assert bool(FLAG.search(text)) is found
