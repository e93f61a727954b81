"""Offline checks of the cluster configs in ``cluster/`` (no cloud credentials, no Ray cluster).

* Autoscaler YAMLs (``aws.yaml``, ``gcp.yaml``) go through Ray's own ``prepare_config`` (merges the
  provider's ``defaults.yaml`` exactly as ``ray up`` does) and ``validate_config`` (``ray-schema.json``
  from the installed wheel), then through our invariants.
* KubeRay manifests go through a small JSON schema plus invariants, and the cluster spec through
  Ray's own RayCluster -> autoscaling-config translation (what the in-tree autoscaler runs).

Every checker is also fed a broken config, so each check is shown to be able to fail.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AUTOSCALER_FILES = ["aws.yaml", "gcp.yaml"]
GPU_MODELS = {"A100", "H100"}
GPU_KEY = "nvidia.com/gpu"


def load(name: str) -> dict[str, Any]:
    with open(CLUSTER / name) as fh:
        return yaml.safe_load(fh)


def pinned_ray_version(deps: list[str]) -> str:
    """The exact version in pyproject's ``ray[...]==X`` dependency (fails if it is not an exact pin)."""
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"pyproject.toml must pin Ray exactly once as ray[...]==X, got {deps}"
    return pins[0]


def image_ray_version(image: str) -> str | None:
    """``rayproject/ray:2.60.0-py311-gpu`` -> ``"2.60.0"``; None for images we cannot read."""
    m = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)(?:-[\w.-]+)?", image)
    return m.group(1) if m else None


def version_problems(where: str, image: str | None, version: str) -> list[str]:
    if not image:
        return [f"{where}: no image"]
    found = image_ray_version(image)
    return [] if found == version else [f"{where}: image {image!r} is not Ray {version}"]


# --------------------------------------------------------------------------- autoscaler YAMLs


def ray_validate(raw: dict[str, Any]) -> dict[str, Any]:
    """Ray's own pipeline behind ``ray up``: merge defaults, fill node types, schema-validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def autoscaler_problems(raw: dict[str, Any], version: str) -> list[str]:
    """Our invariants on top of Ray's validation (checked on the merged config, like ``ray up``)."""
    cfg = ray_validate(raw)
    problems = [f"{key} must be set explicitly" for key in ("max_workers", "idle_timeout_minutes") if key not in raw]
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if head["resources"].get("CPU") != 0:
        problems.append(f"head resources must be {{'CPU': 0}}, got {head['resources']}")
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    for name, t in gpu_types.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"GPU node type {name}: min_workers must be 0, got {t['min_workers']}")
    models = {key.split(":", 1)[1] for t in gpu_types.values() for key in t["resources"] if key.startswith("accelerator_type:")}
    if not GPU_MODELS <= models:
        problems.append(f"GPU node types must cover {sorted(GPU_MODELS)}, got {sorted(models)}")
    if len(workers) == len(gpu_types):
        problems.append("no CPU-only worker type")
    docker = cfg.get("docker") or {}
    for key in ("image", "head_image", "worker_image"):
        if key == "image" or key in docker:
            problems += version_problems(f"docker.{key}", docker.get(key), version)
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    if "0.0.0.0" in head_cmds:
        problems.append("head_start_ray_commands binds 0.0.0.0 (dashboard must stay on 127.0.0.1)")
    for host in re.findall(r"--dashboard-host[= ](\S+)", head_cmds):
        if host not in ("127.0.0.1", "localhost"):
            problems.append(f"--dashboard-host={host}: must be 127.0.0.1")
    if not any("pip install" in c and "realfake-ray" in c for c in cfg["setup_commands"]):
        problems.append("setup_commands do not install realfake-ray")
    return problems


@pytest.fixture(scope="module")
def version(pyproject: dict) -> str:
    return pinned_ray_version(pyproject["project"]["dependencies"])


def test_pyproject_pins_the_installed_ray(version: str) -> None:
    import ray

    assert version == ray.__version__, "client Ray must equal the pinned (cluster) Ray"


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
def test_autoscaler_config_is_valid(name: str, version: str) -> None:
    assert autoscaler_problems(load(name), version) == []


def _head(cfg: dict) -> dict:
    return cfg["available_node_types"][cfg["head_node_type"]]


def _gpu_type(cfg: dict) -> dict:
    return next(t for t in cfg["available_node_types"].values() if t["resources"].get("GPU"))


AUTOSCALER_MUTATIONS = {
    "head_cpu_2": (lambda c: _head(c)["resources"].update(CPU=2), "head resources"),
    "gpu_min_workers_1": (lambda c: _gpu_type(c).update(min_workers=1), "min_workers must be 0"),
    "old_image": (lambda c: c["docker"].update(image="rayproject/ray:2.40.0-py311-gpu"), "is not Ray"),
    "dashboard_public": (
        lambda c: c.update(head_start_ray_commands=[s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]),
        "0.0.0.0",
    ),
    # Without our override Ray's defaults.yaml supplies `--dashboard-host=0.0.0.0`.
    "default_start_commands": (lambda c: c.pop("head_start_ray_commands"), "0.0.0.0"),
    "no_project_install": (lambda c: c.update(setup_commands=[]), "realfake-ray"),
    "no_idle_timeout": (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
    "only_a100": (lambda c: [c["available_node_types"].pop(k) for k in list(c["available_node_types"]) if "h100" in k], "H100"),
}


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
@pytest.mark.parametrize("mutation", sorted(AUTOSCALER_MUTATIONS))
def test_autoscaler_checker_rejects_mutation(name: str, mutation: str, version: str) -> None:
    mutate, expected = AUTOSCALER_MUTATIONS[mutation]
    cfg = load(name)
    mutate(cfg)
    problems = autoscaler_problems(cfg, version)
    assert any(expected in p for p in problems), problems


RAY_SCHEMA_MUTATIONS = {
    "unknown_top_level_key": lambda c: c.update(head_dashboard_public=True),
    "string_resource": lambda c: _gpu_type(c)["resources"].update(GPU="8"),
    "head_type_missing": lambda c: c.update(head_node_type="no-such-type"),
    "missing_node_config": lambda c: _gpu_type(c).pop("node_config"),
}


@pytest.mark.parametrize("name", AUTOSCALER_FILES)
@pytest.mark.parametrize("mutation", sorted(RAY_SCHEMA_MUTATIONS))
def test_ray_validation_rejects_mutation(name: str, mutation: str) -> None:
    cfg = load(name)
    RAY_SCHEMA_MUTATIONS[mutation](cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        ray_validate(cfg)


# --------------------------------------------------------------------------- KubeRay manifests

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "image", "resources"],
                        "properties": {
                            "name": {"type": "string"},
                            "image": {"type": "string"},
                            "resources": {
                                "type": "object",
                                "required": ["limits"],
                                "properties": {"limits": _STRING_MAP, "requests": _STRING_MAP},
                            },
                        },
                    },
                },
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "nodeSelector": _STRING_MAP,
            },
        }
    },
}
_COUNT = {"type": "integer", "minimum": 0}
RAY_CLUSTER_SPEC_SCHEMA = {
    "type": "object",
    "required": ["rayVersion", "enableInTreeAutoscaling", "headGroupSpec", "workerGroupSpecs"],
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"const": True},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {
                "rayStartParams": _STRING_MAP,
                "template": _POD_TEMPLATE,
                "serviceType": {"const": "ClusterIP"},  # never LoadBalancer/NodePort
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": _COUNT,
                    "minReplicas": _COUNT,
                    "maxReplicas": _COUNT,
                    "rayStartParams": _STRING_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}


def manifest_schema(kind: str, spec_schema: dict) -> dict:
    """Schema of a ``ray.io/v1`` custom resource of ``kind`` with the given ``spec`` schema."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
            "spec": spec_schema,
        },
    }


RAY_CLUSTER_SCHEMA = manifest_schema("RayCluster", RAY_CLUSTER_SPEC_SCHEMA)
RAY_JOB_SCHEMA = manifest_schema(
    "RayJob",
    {
        "type": "object",
        "required": ["entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "rayClusterSpec"],
        "properties": {
            "entrypoint": {"type": "string"},
            "runtimeEnvYAML": {"type": "string"},
            "shutdownAfterJobFinishes": {"const": True},
            "rayClusterSpec": RAY_CLUSTER_SPEC_SCHEMA,
        },
    },
)


def schema_problems(doc: Any, schema: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def cluster_spec_problems(spec: dict, version: str, where: str) -> list[str]:
    """Invariants of a RayCluster spec (also the ``rayClusterSpec`` of a RayJob); schema checked first."""
    problems = [f"{where}.{p}" for p in schema_problems(spec, RAY_CLUSTER_SPEC_SCHEMA)]
    if problems:
        return problems
    if spec["rayVersion"] != version:
        problems.append(f"{where}.rayVersion {spec['rayVersion']!r} != pinned {version}")
    head = spec["headGroupSpec"]
    if head["rayStartParams"].get("num-cpus") != "0":
        problems.append(f"{where}.headGroupSpec: rayStartParams num-cpus must be \"0\"")
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g['groupName']}]", g) for g in spec["workerGroupSpecs"]]
    for label, group in groups:
        for c in _containers(group):
            problems += version_problems(f"{where}.{label}.{c['name']}", c["image"], version)
    n_gpu_groups = 0
    for label, g in groups[1:]:
        if not g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]:
            problems.append(f"{where}.{label}: need minReplicas <= replicas <= maxReplicas")
        gpu_limits = [c["resources"]["limits"].get(GPU_KEY) for c in _containers(g)]
        if "gpu" not in g["groupName"].lower() and not any(gpu_limits):
            continue
        n_gpu_groups += 1
        if not any(lim and int(lim) > 0 for lim in gpu_limits):
            problems.append(f"{where}.{label}: GPU group without {GPU_KEY} limits")
        if g["minReplicas"] != 0:
            problems.append(f"{where}.{label}: GPU group minReplicas must be 0")
        if not any(t.get("key") == GPU_KEY for t in g["template"]["spec"].get("tolerations", [])):
            problems.append(f"{where}.{label}: GPU group without a {GPU_KEY} toleration")
    if n_gpu_groups == 0 or n_gpu_groups == len(groups) - 1:
        problems.append(f"{where}: need both GPU and CPU worker groups")
    return problems


def raycluster_problems(doc: dict, version: str) -> list[str]:
    problems = schema_problems(doc, RAY_CLUSTER_SCHEMA)
    return problems or cluster_spec_problems(doc["spec"], version, "spec")


def rayjob_problems(doc: dict, version: str) -> list[str]:
    problems = schema_problems(doc, RAY_JOB_SCHEMA)
    if problems:
        return problems
    spec = doc["spec"]
    if "jobs/scale_in1k.py" not in spec["entrypoint"]:
        problems.append("spec.entrypoint does not run jobs/scale_in1k.py")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    if not isinstance(runtime_env, dict) or not ({"working_dir", "pip"} & set(runtime_env)):
        problems.append("spec.runtimeEnvYAML needs working_dir or pip")
    return problems + cluster_spec_problems(spec["rayClusterSpec"], version, "spec.rayClusterSpec")


def ray_autoscaling_view(name: str, spec: dict) -> dict:
    """What Ray's in-tree autoscaler derives from the cluster spec (it runs ``validate_config`` too)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)


def test_raycluster_is_valid(version: str) -> None:
    assert raycluster_problems(load("kuberay-raycluster.yaml"), version) == []


def test_rayjob_is_valid(version: str) -> None:
    doc = load("kuberay-rayjob.yaml")
    assert rayjob_problems(doc, version) == []
    assert "--mult 10" in doc["spec"]["entrypoint"]


@pytest.mark.parametrize("name,path", [("kuberay-raycluster.yaml", ("spec",)), ("kuberay-rayjob.yaml", ("spec", "rayClusterSpec"))])
def test_ray_autoscaler_reads_kuberay_spec(name: str, path: tuple[str, ...]) -> None:
    spec = load(name)
    for key in path:
        spec = spec[key]
    types = ray_autoscaling_view("realfake", spec)["available_node_types"]
    assert types["headgroup"]["resources"]["CPU"] == 0
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert gpu and all(t["min_workers"] == 0 and t["resources"]["GPU"] == 8 for t in gpu.values())
    assert all(any(k.startswith("accelerator_type:") for k in t["resources"]) for t in gpu.values())


def _worker(spec: dict, gpu: bool) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if ("gpu" in g["groupName"]) == gpu)


def _limits(group: dict) -> dict:
    return _containers(group)[0]["resources"]["limits"]


KUBERAY_MUTATIONS = {
    "string_replicas": (lambda s: _worker(s, True).update(replicas="1"), "is not of type 'integer'"),
    "min_gt_max": (lambda s: _worker(s, False).update(minReplicas=5, replicas=5, maxReplicas=2), "minReplicas <= replicas"),
    "gpu_min_replicas": (lambda s: _worker(s, True).update(minReplicas=1, replicas=1), "minReplicas must be 0"),
    "head_cpu_2": (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": "2"}), "num-cpus"),
    "int_start_param": (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "is not of type 'string'"),
    "no_gpu_limits": (lambda s: _limits(_worker(s, True)).pop(GPU_KEY), "without nvidia.com/gpu limits"),
    "no_toleration": (lambda s: _worker(s, True)["template"]["spec"].pop("tolerations"), "toleration"),
    "load_balancer": (lambda s: s["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
    "ray_version": (lambda s: s.update(rayVersion="2.40.0"), "rayVersion"),
    "old_image": (lambda s: _containers(_worker(s, False))[0].update(image="rayproject/ray:2.40.0-gpu"), "is not Ray"),
    "no_image": (lambda s: _containers(s["headGroupSpec"])[0].pop("image"), "'image' is a required property"),
    "no_group_name": (lambda s: _worker(s, False).pop("groupName"), "'groupName' is a required property"),
    "no_autoscaling": (lambda s: s.update(enableInTreeAutoscaling=False), "True was expected"),
}


@pytest.mark.parametrize("mutation", sorted(KUBERAY_MUTATIONS))
def test_kuberay_checker_rejects_mutation(mutation: str, version: str) -> None:
    mutate, expected = KUBERAY_MUTATIONS[mutation]
    cluster, job = load("kuberay-raycluster.yaml"), load("kuberay-rayjob.yaml")
    mutate(cluster["spec"])
    mutate(job["spec"]["rayClusterSpec"])
    for problems in (raycluster_problems(cluster, version), rayjob_problems(job, version)):
        assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda d: d["spec"].update(entrypoint="python jobs/other.py"), "scale_in1k.py"),
        (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: {A: '1'}"), "working_dir or pip"),
        (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "True was expected"),
        (lambda d: d.update(kind="RayCluster"), "'RayJob' was expected"),
        (lambda d: d["metadata"].pop("name"), "'name' is a required property"),
    ],
)
def test_rayjob_checker_rejects_mutation(mutate, expected: str, version: str) -> None:
    doc = load("kuberay-rayjob.yaml")
    mutate(doc)
    problems = rayjob_problems(doc, version)
    assert any(expected in p for p in problems), problems


def test_ray_kuberay_translation_rejects_bad_resources() -> None:
    spec = load("kuberay-raycluster.yaml")["spec"]
    _worker(spec, True)["rayStartParams"]["resources"] = '"{\\"accelerator_type:A100\\": 0.5}"'
    with pytest.raises(AssertionError):
        ray_autoscaling_view("realfake", spec)


def test_image_version_parser() -> None:
    assert image_ray_version("rayproject/ray:2.60.0-py311-gpu") == "2.60.0"
    assert image_ray_version("rayproject/ray:2.60.0") == "2.60.0"
    assert image_ray_version("rayproject/ray:latest") is None
    assert image_ray_version("example.com/ray:2.60.0") is None
