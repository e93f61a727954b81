"""The stage registry (no Ray): it names every stage package and entry point, each job script is one call
into it, its folders are the run layout's and its headings the report's."""

import ast
from pathlib import Path

import pytest
from helpers import declared_api

from realfake_ray.layout import RunLayout
from realfake_ray.stages.registry import COMMANDS, PIPELINE, RUN, STAGES, TOOLS, comma_list

REPO = Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path:
    path = REPO.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_every_stage_package_is_registered_with_its_driver_entry_point():
    packages = {p.parent.name for p in (REPO / "realfake_ray" / "stages").glob("*/__init__.py")}
    assert packages == {stage.name for stage in STAGES}
    for stage in STAGES:
        assert stage.entry == f"realfake_ray.stages.{stage.name}.driver:run_{stage.name}"


def test_every_entry_point_is_a_function_its_module_exports():
    entries = {c.entry for c in COMMANDS.values()} | {c.job_entry for c in COMMANDS.values()}
    entries |= {c.idle_when for c in COMMANDS.values() if c.idle_when}
    for entry in sorted(entries):
        module, function = entry.split(":")
        assert function in (declared_api(_module_file(module)) or set()), entry


def test_the_pipeline_runs_the_stages_in_registry_order():
    assert PIPELINE == ("caption", "encode", "finetune", "generate", "train", "evaluate")
    assert [c.name for c in COMMANDS.values() if c.idle_when] == ["caption"]  # the job leaves it out when idle
    assert not any(tool.in_pipeline for tool in TOOLS) and not RUN.in_pipeline
    assert COMMANDS["train"].job_entry != COMMANDS["train"].entry  # the job adds the real-only baseline
    assert COMMANDS["encode"].job_entry == COMMANDS["encode"].entry


def _job_command(path: Path) -> str:
    """The command a job script runs; fails unless its code is exactly ``run_job("<command>")`` under the
    ``__main__`` guard (after its docstring and the import)."""
    body = ast.parse(path.read_text()).body
    code = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert len(code) == 2 and ast.unparse(code[0]) == "from realfake_ray.cli import run_job", path
    guard = code[1]
    assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'" and len(guard.body) == 1
    call = guard.body[0].value
    assert ast.unparse(call.func) == "run_job" and len(call.args) == 1, path
    return call.args[0].value


def test_each_job_script_is_one_call_into_the_cli():
    jobs = {path.stem: _job_command(path) for path in sorted((REPO / "jobs").glob("*.py"))}
    assert set(jobs.values()) <= set(COMMANDS)
    assert jobs["scale_in1k"] == "run"
    for stage in STAGES:  # every stage can be submitted on its own
        assert jobs.get(stage.name) == stage.name


def test_the_layout_spells_its_paths_below_the_registered_folders():
    layout = RunLayout("s3://b/run")
    assert layout.outputs("caption") == [layout.captions_dir()] and layout.captions_url().startswith(layout.captions_dir())
    assert layout.outputs("encode") == [layout.bank_dir()] and layout.meta_url().startswith(layout.bank_dir())
    assert layout.outputs("finetune") == [layout.finetune_dir(), layout.lora_dir()]
    assert layout.outputs("generate") == [layout.synthetic_dir()] and layout.shards_dir().startswith(layout.synthetic_dir())
    assert layout.outputs("train") == layout.outputs("evaluate") == [layout.classifier_dir()]
    assert layout.outputs("audit-privacy") == [layout.audit_dir()] and layout.outputs("tune-sampler") == [layout.tune_dir()]
    assert layout.outputs("bench-sampler") == [layout.bench_dir()]


def test_commands_write_to_folders_of_their_own():
    owners: dict[str, set[str]] = {}
    for command in COMMANDS.values():
        for folder in command.outputs:
            assert folder and "/" not in folder and not folder.startswith((".", "_")), (command.name, folder)
            owners.setdefault(folder, set()).add(command.name)
    shared = {folder: names for folder, names in owners.items() if len(names) > 1}
    assert shared == {"classifier": {"train", "evaluate"}}  # evaluate writes its metrics beside the model it scores


def test_every_pipeline_stage_has_its_own_report_section():
    headings = [COMMANDS[name].report for name in PIPELINE]
    assert all(headings) and len(set(headings)) == len(headings)


@pytest.mark.parametrize(("text", "expected"), [("a, b,,c", ["a", "b", "c"]), ("", []), ("train", ["train"])])
def test_comma_list(text, expected):
    assert comma_list(text) == expected
