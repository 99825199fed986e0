"""The package's shape: every module says what it holds; imports run one way."""

from __future__ import annotations

import ast
from pathlib import Path

import tnet

PACKAGE = Path(tnet.__file__).parent
# Which tnet modules each may import at run time (TYPE_CHECKING imports aside).
ALLOWED = {
    "protocol": set(),
    "util": set(),
    "cli": {"protocol", "util", "daemon"},  # daemon only inside `tnet daemon`, never at import
    "store": {"protocol"},
    "localsend": {"protocol"},
    "loop": set(),
    "peers": {"protocol", "loop", "store", "util"},
    "daemon": {"protocol", "loop", "peers", "store", "util"},
    "__main__": {"cli"},
}


def tnet_imports(tree: ast.Module, top_level_only: bool) -> set:
    found = set()
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
                   for inner in ast.walk(node)}
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    found.discard("__init__")
    return {name for name in found if name != "__version__"}


def test_every_module_opens_with_a_docstring():
    for path in PACKAGE.glob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"


def test_imports_run_one_way():
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        if name == "__init__":
            continue
        tree = ast.parse(path.read_text())
        everywhere = tnet_imports(tree, top_level_only=False)
        assert everywhere <= ALLOWED[name], f"{name} imports {everywhere - ALLOWED[name]}"
    cli_top = tnet_imports(ast.parse((PACKAGE / "cli.py").read_text()), top_level_only=True)
    assert "daemon" not in cli_top  # the CLI starts fast: the daemon's code loads only to run one
