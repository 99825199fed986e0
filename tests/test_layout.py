"""The package's shape: every module says what it holds; imports run one way
(TYPE_CHECKING ones too: a module never names one above it); no class or
function too long to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import tnet

PACKAGE = Path(tnet.__file__).parent
# Which tnet modules each may import at run time (TYPE_CHECKING imports aside).
ALLOWED = {
    "protocol": set(),
    "util": set(),
    "api": {"protocol"},
    "http": {"protocol", "util"},
    "cli": {"api", "util", "daemon"},  # daemon only inside `tnet daemon`, never at import
    "localsend": {"protocol"},
    "loop": set(),
    "store": {"protocol"},
    "walk": {"protocol", "util"},
    "clients": {"api", "loop", "protocol"},
    "discovery": {"protocol", "loop", "util"},
    "peers": {"api", "protocol", "keep", "loop", "store", "util"},
    "keep": {"protocol", "store"},
    "inbound": {"api", "protocol", "keep", "peers", "store", "util"},
    "outbound": {"api", "history", "protocol", "peers", "util", "walk"},
    "sending": {"api", "protocol", "discovery", "outbound", "peers", "walk"},
    "commands": {"api", "protocol", "clients", "discovery", "loop", "lsdoor", "lsfind", "lssend", "outbound", "peers",
                 "recorder", "sending", "store", "util", "walk"},
    "daemon": {"protocol", "clients", "commands", "discovery", "history", "inbound", "keep", "loop", "lsdoor",
               "outbound", "peers", "recorder", "sending", "store", "util"},
    "tls": {"util", "x509"},
    "httpconn": {"http", "loop", "tls"},
    "lsfind": {"http", "httpconn", "localsend", "loop", "protocol", "util"},
    "lsreceive": {"api", "localsend", "peers", "store", "util"},
    "lsdoor": {"api", "http", "httpconn", "localsend", "lsfind", "lsreceive", "peers", "protocol", "tls", "util"},
    "lssend": {"api", "discovery", "history", "http", "httpconn", "localsend", "lsdoor", "lsfind", "outbound",
               "peers", "protocol", "sending", "util", "walk"},
    "history": {"api", "protocol", "util"},
    "recorder": {"history", "loop"},
    "__main__": {"cli"},
    "x509": {"protocol"},
}


MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def tnet_imports(tree: ast.Module, top_level_only: bool) -> set:
    """Every tnet module ``tree`` imports, TYPE_CHECKING imports included."""
    found = set()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
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


def test_no_class_or_function_is_too_long_to_read_at_once():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            assert length <= limit, f"{path.name}: {node.name} has {length} lines (at most {limit})"


def test_the_layers_form_no_cycle():
    graph = {name: targets - {"daemon"} if name == "cli" else targets for name, targets in ALLOWED.items()}
    seen: dict = {}

    def visit(name: str, path: tuple) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        if seen.get(name):
            return
        for target in graph.get(name, ()):
            visit(target, path + (name,))
        seen[name] = True

    for name in graph:
        visit(name, ())
