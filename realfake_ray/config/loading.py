"""Resolving a :class:`RunConfig`: defaults < preset < YAML file < flags < ``--set`` overrides, with errors that
name the field, the value given and what is allowed."""

from __future__ import annotations

import copy
import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from realfake_ray import storage
from realfake_ray.config.sections import PRESETS, ConfigError, RunConfig

__all__ = [
    "RENAMED_KEYS", "deep_merge", "parse_override", "read_yaml_config", "build_config", "load_config", "dump_config",
]


# Values the tiny preset sets beneath the user's YAML and flags: a laptop-sized end-to-end run.
_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {"pretrained": "preset:tiny"},
        "caption": {"enabled": False},  # the digits need no captions: prompts are "photo of digit seven"
        "encode": {"resolution": 32, "batch_size": 128, "rows_per_file": 512, "dtype": "fp32"},
        "finetune": {
            "num_workers": 2,
            "batch_size": 16,
            "max_steps": 300,
            "lr": 1e-3,
            "mixed_precision": "no",
            "checkpoint_every": 100,
            "log_every": 20,
        },
        # Sampled as three seeds of the effectiveness benchmark agree trains the best classifiers on the digits
        # (`GENERATE_RECIPES`); `generate.recipe=paper` gives the paper's sampler.
        "generate": {
            "recipe": "tiny-tuned", "batch_size": 64, "dtype": "fp32", "channels_last": False,
            # 2 × 0.75 CPU: on 2 cores both actors start and 0.5 CPU is left for the read/write tasks.
            "actors": {"min_size": 2, "max_size": 2, "cpus_per_actor": 0.75},
        },
        # One CPU for the training worker and one per decode task: on 2 cores the job's two classifiers train one
        # after the other. Side by side at half a CPU each they took 633 s against 428 (README, "Time").
        "train": {"recipe": "digits-32px", "batch_size": 64, "num_workers": 1, "worker_cpus": 1.0, "torch_threads": 2,
                  "real_baseline": True},
        "evaluate": {"batch_size": 256, "max_samples": 500},
    }
}


# Keys renamed so that they say what they mean in this field: an old key is refused, naming the new one.
RENAMED_KEYS = {
    "finetune.guidance": "finetune.vision_token",
    "generate.guidance": "generate.vision_token",
    "generate.allow_guidance_mismatch": "generate.allow_vision_token_mismatch",
    "generate.negative_guidance_token": "generate.negative_vision_token",
    "generate.accelerator": "generate.speedup",
    "generate.rows_per_manifest_file": "generate.images_per_shard",
    # captioning left the encode stage for its own (the caption stage, `caption:` section)
    "encode.caption": "caption.enabled",
    "encode.captioner": "caption.model",
    "encode.caption_max_tokens": "caption.max_tokens",
    "encode.caption_batch_size": "caption.batch_size",
}


def _refuse_renamed_keys(raw: dict) -> None:
    """ConfigError for a key of :data:`RENAMED_KEYS` anywhere it can be given (also as a sampler-tuning axis)."""
    tuning = raw.get("tune_sampler") if isinstance(raw.get("tune_sampler"), dict) else {}
    places = {f"{s}.{k}": (raw.get(s), k) for s, k in (key.split(".") for key in RENAMED_KEYS)}
    for section in ("axes", "reference"):
        for old in RENAMED_KEYS:
            if old.startswith("generate."):
                places[f"tune_sampler.{section}.{old.split('.')[1]}"] = (tuning.get(section), old.split(".")[1])
    for dotted, (node, key) in places.items():
        if isinstance(node, dict) and key in node:
            was = dotted if dotted in RENAMED_KEYS else f"generate.{key}"
            new = RENAMED_KEYS[was]
            to = f"to {new.split('.')[-1]!r}" if new.split(".")[0] == was.split(".")[0] else "and moved"
            raise ConfigError(f"{dotted}: this key was renamed {to} ({new}); use the new name")


def deep_merge(base: dict, update: dict) -> dict:
    """Recursively merge ``update`` into a copy of ``base`` (dicts merge, other values replace)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def read_yaml_config(path: str) -> dict:
    """Read a YAML config file (any fsspec URL) into a dict."""

    if not storage.exists(path):
        raise ConfigError(f"--config: file not found: {path}")
    try:
        data = yaml.safe_load(storage.read_text(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _section_fields(loc: tuple) -> list[str]:
    """The keys allowed in the section that holds ``loc`` (a pydantic error location)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation if str(part) in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _unknown_key(loc: tuple, given: Any) -> str:
    dotted, allowed = ".".join(map(str, loc)), _section_fields(loc)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"  {dotted}: unknown key (got {given!r}); {hint}allowed: {', '.join(allowed)}"


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(err["loc"], err.get("input")))
            continue
        given = err.get("input")
        lines.append(f"  {loc}: {err['msg']} (got {given!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def build_config(raw: dict) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig`, raising :class:`ConfigError` with readable text."""
    _refuse_renamed_keys(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(
    *,
    preset: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    **flags: Any,
) -> RunConfig:
    """Resolve defaults < preset < YAML < flags (dotted keys, None = not given) < ``--set`` overrides."""
    raw: dict = {}
    file_values = read_yaml_config(config_file) if config_file else {}
    preset = preset or file_values.get("preset")
    if preset is not None:
        if preset not in _PRESET_VALUES:
            raise ConfigError(f"preset: unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
        raw = deep_merge(_PRESET_VALUES[preset], {"preset": preset})
    raw = deep_merge(raw, file_values)
    for dotted, value in flags.items():
        if value is not None:
            _set_dotted(raw, dotted.replace("__", "."), value)
    for item in overrides or []:
        _set_dotted(raw, *parse_override(item))
    return build_config(raw)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what each stage writes next to its output)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
