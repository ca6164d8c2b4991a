"""How the API's modules depend on one another: no import cycles, no import of the workers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _module_files(package: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(path: Path) -> set[str]:
    """Every name imported anywhere in the file: at the top, under TYPE_CHECKING, in functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph(package: str) -> dict[str, set[str]]:
    """Module → the package's modules it imports (`from a import b` counts `a.b` if a module)."""
    modules = _module_files(package)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _imported(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for target in sorted(graph[module]):
            found = visit(target, [*path, module])
            if found:
                return found
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module, [])
        if found:
            return found
    return None


def test_api_modules_import_one_another_without_cycles() -> None:
    graph = _graph("api")
    assert graph.get("api.state"), "the graph must see the API's modules"
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_api_never_imports_the_workers() -> None:
    for module, path in _module_files("api").items():
        workers = {name for name in _imported(path) if name.split(".")[0] == "workers"}
        assert not workers, f"{module} imports {sorted(workers)}"


def test_one_watcher_hears_of_every_client_disconnect() -> None:
    """Streams and long polls share `api.disconnect`; no response runs a listener of its own
    (sse-starlette's EventSourceResponse would: it has its own disconnect task)."""
    listeners = []
    for module, path in _module_files("api").items():
        strings = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and node.value == "http.disconnect"
        }
        if strings or "sse_starlette.EventSourceResponse" in _imported(path):
            listeners.append(module)
    assert listeners == ["api.disconnect"]
