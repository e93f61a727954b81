"""Import structure: pure modules work without Ray, stages stay independent, no cycles, no hidden imports."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "realfake_ray"

# Folder rules. The Ray layer is the stage drivers (``stages/<stage>/driver.py``), the pipeline, the tools'
# drivers and the cluster wiring; every other module (``method/`` above all) is pure torch/diffusers/pyarrow and
# must import (and so be unit-testable) without Ray.
STAGES = ("caption", "encode", "finetune", "generate", "train", "evaluate")
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


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _ in _own_imports(name, path) if t in modules and t != name}
            for name, path in modules.items()}


def test_pure_modules_do_not_import_ray():
    pure = sorted(m for m in _modules() if not _is_ray_layer(m))
    assert len(pure) > 30
    code = "import sys\n" + "".join(f"import {m}\nassert 'ray' not in sys.modules, '{m} imported ray'\n" for m in pure)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


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


def test_every_module_declares_its_public_api():
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(m for m, path in _modules().items() if path.name != '__init__.py' or m == 'realfake_ray.config')!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    public = getattr(module, '__all__', None)\n"
        "    assert public, f'{name} has no __all__'\n"
        "    missing = [n for n in public if not hasattr(module, n)]\n"
        "    assert not missing, f'{name}.__all__ names {missing}, which it does not define'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_stage_driver_exports_only_its_entry_point():
    for stage in STAGES:
        tree = ast.parse((PACKAGE / "stages" / stage / "driver.py").read_text())
        (declared,) = [node.value for node in tree.body
                       if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"]
        exported = ast.literal_eval(declared)
        assert exported == [f"run_{stage}"], (stage, exported)
