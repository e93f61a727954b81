"""Import structure: pure modules work without Ray, stages stay independent, no cycles, no hidden imports."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "realfake_ray"

# The Ray layer: stage drivers, the jobs that orchestrate them and the cluster wiring. Every other module is
# pure torch/diffusers/pyarrow and must import (and so be unit-testable) without Ray.
RAY_MODULES = {
    "realfake_ray.encode", "realfake_ray.finetune", "realfake_ray.generate", "realfake_ray.train",
    "realfake_ray.evaluate", "realfake_ray.run", "realfake_ray.audit_privacy", "realfake_ray.tune_sampler",
    "realfake_ray._internal.cluster",
}
STAGES = ("encode", "finetune", "generate", "train", "evaluate")
SAME_STAGE = {("realfake_ray.train", "realfake_ray.evaluate")}  # train/evaluate is one stage: train evaluates


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
    pure = sorted(set(_modules()) - RAY_MODULES)
    assert len(pure) > 30
    code = "import sys\n" + "".join(f"import {m}\nassert 'ray' not in sys.modules, '{m} imported ray'\n" for m in pure)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_ray_module_list_names_existing_modules():
    assert RAY_MODULES <= set(_modules())


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


def test_no_stage_module_imports_another():
    stages = {f"realfake_ray.{s}" for s in STAGES}
    graph = _graph()
    crossing = sorted((a, b) for a in stages for b in graph[a] & stages if (a, b) not in SAME_STAGE)
    assert not crossing, crossing


def test_every_module_declares_its_public_api():
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(m for m in _modules() if not m.endswith(('realfake_ray', '_internal', 'models', 'data')))!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    public = getattr(module, '__all__', None)\n"
        "    assert public, f'{name} has no __all__'\n"
        "    missing = [n for n in public if not hasattr(module, n)]\n"
        "    assert not missing, f'{name}.__all__ names {missing}, which it does not define'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_stage_module_exports_only_its_entry_point():
    for stage in STAGES:
        tree = ast.parse((PACKAGE / f"{stage}.py").read_text())
        (declared,) = [node.value for node in tree.body
                       if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"]
        exported = ast.literal_eval(declared)
        assert exported == [f"run_{stage}"], (stage, exported)
