"""The package's layout is its data flow: every module imports, no import circle, and the
wings point down (data and model know nothing of Ray's trainers or MLflow)."""

from __future__ import annotations

import ast
import importlib

import pytest

from helpers.paths import REPO

PACKAGE = REPO / "cola_ray"
WINGS = ("data", "model", "train", "downstream")
# Who may import whom: a wing imports itself, the top-level config, and the wings before it.
MAY_IMPORT = {"data": {"data"}, "model": {"model", "data"}, "train": {"train", "model", "data"},
              "downstream": {"downstream", "train", "model", "data"}}


def modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def imports_of(module: str) -> set[str]:
    """The cola_ray modules (and top-level third-party packages, as ``ext:<name>``) that
    ``module`` imports anywhere in its body, functions included."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("cola_ray"):
                found.add(name)
            else:
                found.add("ext:" + name.split(".")[0])
    known = set(modules())
    # "from cola_ray.data import shards" names a module; "from cola_ray.config import Config" does not.
    return {n for n in found if n.startswith("ext:") or n in known}


def test_every_module_imports():
    for name in modules():
        importlib.import_module(name)


def test_no_import_circle_in_the_package():
    graph = {m: {n for n in imports_of(m) if not n.startswith("ext:") and n != m} for m in modules()}
    # A package's __init__ may name its modules lazily; edges into an __init__ from its own
    # modules are not a dependency of the module on its siblings.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if m.startswith(n + "."):  # a module importing its own package (the __init__)
                continue
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def wing_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else None


@pytest.mark.parametrize("wing", WINGS)
def test_wings_point_down_the_data_flow(wing):
    for m in modules():
        if wing_of(m) != wing:
            continue
        for n in imports_of(m):
            other = wing_of(n) if not n.startswith("ext:") else None
            if n.startswith("cola_ray.") and n.split(".")[1] in ("cli", "demo"):
                raise AssertionError(f"{m} imports {n}: the top level uses the wings, not the other way")
            if other is not None:
                assert other in MAY_IMPORT[wing], f"{m} imports {n}: {wing}/ may use only {sorted(MAY_IMPORT[wing])}"


def test_model_and_data_import_no_ray_and_no_mlflow():
    for m in modules():
        if wing_of(m) not in ("data", "model") or m == "cola_ray.data.pipeline":
            continue
        bad = {n for n in imports_of(m) if n in ("ext:ray", "ext:mlflow")}
        assert not bad, f"{m} imports {sorted(bad)}: only data/pipeline, train/ and downstream/ may"
