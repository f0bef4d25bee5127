"""The architecture's layers, read from the code's imports: no import circles, no process importing another
tier's modules, views any process can render, services above routes, plumbing below both."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "core", "models", "ops", "views", "worker")


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _imported(module: str) -> set[str]:
    """First-party modules `module` imports anywhere in its file (under TYPE_CHECKING too: a circle of types is
    a circle of ideas)."""
    found: set[str] = set()
    is_package = MODULES[module].name == "__init__.py"
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parent, *([base] if base else [])])
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imported(module) for module in MODULES}


def _edges(source: str, target: str) -> Iterator[tuple[str, str]]:
    for module, imported in GRAPH.items():
        if module == source or module.startswith(source + "."):
            yield from ((module, name) for name in imported if name == target or name.startswith(target + "."))


def _circles() -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for name in GRAPH[module]:
            if name not in index:
                visit(name)
                low[module] = min(low[module], low[name])
            elif name in stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            component = []
            while (member := stack.pop()) != module:
                component.append(member)
            if component:
                circles.append(sorted([module, *component]))

    for module in GRAPH:
        if module not in index:
            visit(module)
    return circles


def test_no_module_imports_itself_through_others() -> None:
    assert _circles() == []


def test_each_tier_imports_only_the_shared_layers() -> None:
    """The API never imports a worker's modules, nor a worker the API's; the shared layers import neither."""
    crossings = [
        *_edges("api", "worker"),
        *(edge for source in ("worker", "views", "core", "models") for edge in _edges(source, "api")),
        *(edge for source in ("views", "core", "models") for edge in _edges(source, "worker")),
    ]
    assert crossings == []


def test_services_sit_above_plumbing_and_below_routes() -> None:
    assert list(_edges("api.services", "api.routes")) == []
    below = [edge for target in ("api.services", "api.routes", "api.errors") for edge in _edges("api.infra", target)]
    assert below == []


def _loaded_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_the_views_render_in_any_process() -> None:
    """A prediction's view in each dialect is pure data → JSON: no web framework, metrics or torch comes along."""
    assert _loaded_by("import views") & {"api", "fastapi", "starlette", "prometheus_client", "torch", "worker"} == set()


def test_the_context_carries_services_without_importing_them() -> None:
    code = "import sys, api.context; print(sorted(m for m in sys.modules if m.startswith('api.services')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_webhook_worker_loads_nothing_of_the_http_tier() -> None:
    assert _loaded_by("import worker.webhooks") & {"api", "fastapi", "starlette", "torch", "diffusers"} == set()
