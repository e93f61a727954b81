"""Import structure: pure modules work without Ray, stages stay independent, no cycles, no hidden imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import declared_api

from realfake_ray.stages import registry

PACKAGE = Path(__file__).resolve().parents[1] / "realfake_ray"

# Folder rules. The Ray layer is the stage drivers (``stages/<stage>/driver.py``), the pipeline, the tools'
# drivers and the cluster wiring; every other module (``method/`` above all) is pure torch/diffusers/pyarrow and
# must import (and so be unit-testable) without Ray.
STAGES = tuple(stage.name for stage in registry.STAGES)  # one package each: stages/<name>/
# train ends with an evaluation: its driver may call the evaluate stage's entry point, and nothing else of it.
STAGE_CALLS = {("train", "realfake_ray.stages.evaluate.driver")}


def _is_ray_layer(name: str) -> bool:
    parts = name.split(".")[1:]
    return (parts[:1] == ["stages"] and (parts[-1] in ("driver", "pipeline"))) or (
        parts[:1] == ["tools"] and parts[-1] == "driver") or name == "realfake_ray._internal.cluster"


def _stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" and parts[2] in STAGES else None


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _own_imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported realfake_ray module, imported at module level?) for every import of our own code."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "realfake_ray":
                found.append((target, id(node) in top))
    return found


def _crossings(name: str, source: str, modules: dict[str, Path]) -> list[str]:
    """Every name ``name`` takes from another of our modules outside that module's ``__all__``: a ``from m import
    x`` of a name m does not export, and an attribute ``alias.x`` of a module imported as ``alias``. A
    ``_private`` name is never exported, so it never crosses."""
    tree, found, aliases = ast.parse(source), [], {}
    package = name if modules.get(name, Path()).name == "__init__.py" else name.rpartition(".")[0]

    def check(module: str, attr: str, line: int) -> None:
        api = declared_api(modules[module]) or set()
        if attr.startswith("_") or attr not in api:
            found.append(f"{name}:{line} uses {module}.{attr}, which {module}.__all__ does not export")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if module not in modules or module == name:
                continue
            for alias in node.names:
                if f"{module}.{alias.name}" in modules:  # a submodule: its own attributes are checked below
                    aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
                else:
                    check(module, alias.name, node.lineno)
        elif isinstance(node, ast.Import):
            aliases.update({alias.asname: alias.name for alias in node.names if alias.asname and alias.name in modules})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            check(aliases[node.value.id], node.attr, node.lineno)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _own_imports(name, path) if t in modules and t != name}
            for name, path in modules.items()}


@pytest.fixture(scope="module")
def imported_everything() -> dict:
    """One interpreter (importing every module is most of the cost) imports the pure modules first, recording any
    that pulls in Ray, then every module, recording what each ``__all__`` lacks: ``{"ray": [...], "api": [...]}``."""
    pure = sorted(m for m in _modules() if not _is_ray_layer(m))
    assert len(pure) > 30
    checked = sorted(m for m, path in _modules().items() if path.name != "__init__.py" or m == "realfake_ray.config")
    code = (
        "import importlib, json, sys\n"
        "found = {'ray': [], 'api': []}\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "    if 'ray' in sys.modules and not found['ray']:\n"
        "        found['ray'].append(f'{name} imported ray')\n"
        f"for name in {checked!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    public = getattr(module, '__all__', None)\n"
        "    missing = [n for n in public or () if not hasattr(module, n)]\n"
        "    if not public or missing:\n"
        "        found['api'].append(f'{name}: no __all__' if not public else f'{name}.__all__ names {missing}, which it does not define')\n"
        "print(json.dumps(found))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pure_modules_do_not_import_ray(imported_everything):
    assert imported_everything["ray"] == []


def test_the_ray_layer_is_the_drivers_the_pipeline_and_the_cluster_wiring():
    ray_layer = {m for m in _modules() if _is_ray_layer(m)}
    assert {f"realfake_ray.stages.{s}.driver" for s in STAGES} | {"realfake_ray.stages.pipeline"} <= ray_layer
    assert not any(m.startswith(("realfake_ray.method", "realfake_ray.data", "realfake_ray.models")) for m in ray_layer)


def test_our_own_modules_are_imported_at_the_top_of_files():
    hidden = [f"{name} imports {target} inside a function" for name, path in _modules().items()
              for target, top in _own_imports(name, path) if not top]
    assert not hidden, hidden


def test_module_imports_have_no_cycle():
    graph = _graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: {"a": {"b"}, "b": {"c"}, "c": {"a"}})
    try:
        test_module_imports_have_no_cycle()
    except AssertionError as error:
        assert "a -> b -> c -> a" in str(error)
    else:
        raise AssertionError("a three-module cycle went unnoticed")


def test_no_module_uses_a_name_another_module_does_not_export():
    modules = _modules()
    crossing = [c for name, path in modules.items() for c in _crossings(name, path.read_text(), modules)]
    assert not crossing, "\n".join(crossing)


def test_the_boundary_check_finds_unexported_and_private_names():
    modules = _modules()
    source = ("from realfake_ray.method.sampler import Sampler, _to_device_dtype\n"
              "from realfake_ray.stages.evaluate.driver import run_evaluate, ClassifierActor\n"
              "from realfake_ray import storage\n"
              "from realfake_ray.models import loading as models\n"
              "import realfake_ray.method.lora as lora\n"
              "storage.join('a', 'b'); storage._no_such; models.resolve_model_dir; lora.not_exported\n")
    found = _crossings("realfake_ray.tools.example", source, modules)
    assert [f.split(" uses ")[1].split(",")[0] for f in found] == [
        "realfake_ray.method.sampler._to_device_dtype", "realfake_ray.stages.evaluate.driver.ClassifierActor",
        "realfake_ray.storage._no_such", "realfake_ray.method.lora.not_exported"], found


def test_no_stage_imports_another():
    crossing = sorted(
        (a, b) for a, targets in _graph().items() for b in targets
        if _stage_of(a) and _stage_of(b) and _stage_of(a) != _stage_of(b) and (_stage_of(a), b) not in STAGE_CALLS
    )
    assert not crossing, crossing


def test_nothing_under_method_imports_a_stage_or_a_tool():
    upward = sorted((a, b) for a, targets in _graph().items() if a.startswith("realfake_ray.method")
                    for b in targets if b.startswith(("realfake_ray.stages", "realfake_ray.tools")))
    assert not upward, upward


def test_every_module_declares_its_public_api(imported_everything):
    assert imported_everything["api"] == []


def test_a_stage_driver_exports_only_its_entry_point():
    for stage in STAGES:
        tree = ast.parse((PACKAGE / "stages" / stage / "driver.py").read_text())
        (declared,) = [node.value for node in tree.body
                       if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"]
        exported = ast.literal_eval(declared)
        assert exported == [f"run_{stage}"], (stage, exported)
