"""Preflight of the whole job (no Ray, no model weights): every dataset, labels file, classes file, captions file,
extra evaluation set and model location (the diffusion model's, the captioner's) the selected stages will need is
checked before the first stage starts, and every problem is named in one error — before any GPU-hour is spent.

Listings made here are reused by the stages of the same job (``data.sources.listing_cache``).

Example:
    >>> preflight(load_config(preset="tiny", out="runs/demo"), ["encode", "train", "evaluate"])  # doctest: +SKIP
"""

from __future__ import annotations

from realfake_ray import storage
from realfake_ray.config import RunConfig
from realfake_ray.data.captions import caption_stage_idle, missing_captions_error, read_captions, training_captions_url
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.labelled import real_set, real_train_set
from realfake_ray.data.sources import check_readable, load_class_names
from realfake_ray.models.loading import model_location_problem

__all__ = ["PreflightError", "preflight"]


class PreflightError(ValueError):
    """One or more inputs of the job are unusable; the message lists each (what, where, what is wrong)."""


def _problem(what: str, url: str, exc: Exception) -> str:
    """``what url: message`` (the URL once: most messages name it already)."""
    message = str(exc) if isinstance(exc, (DatasetError, OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
    return f"{what}: {message}" if url in message else f"{what} {url}: {message}"


def _datasets(cfg: RunConfig, stages: list[str], problems: list[str]) -> None:
    d = cfg.require_data()
    try:
        train = real_train_set(cfg)
        check_readable(train)
    except Exception as exc:
        problems.append(_problem("data.train", d.train, exc))
        return  # the other sets are read with the train set's classes
    sets = [("data.val", d.val, d.val_labels)] if d.val else []
    if "evaluate" in stages or "train" in stages:
        sets += [(f"evaluate.extra_sets[{n!r}]", u, None) for n, u in cfg.evaluate.extra_sets.items()]
    for what, url, labels in sets:
        try:
            check_readable(real_set(url, cfg, train.class_dirs, labels))
        except Exception as exc:
            problems.append(_problem(what, url, exc))


def _side_files(cfg: RunConfig, stages: list[str], problems: list[str]) -> None:
    d = cfg.data
    if d.classes_file:
        try:
            load_class_names(d.classes_file)
        except Exception as exc:
            problems.append(_problem("data.classes_file", d.classes_file, exc))
    if d.captions_file:
        try:
            read_captions(d.captions_file)
        except Exception as exc:
            problems.append(_problem("data.captions_file", d.captions_file, exc))
    made = None if d.captions_file else training_captions_url(cfg)  # the caption stage's, when captioning is on
    if made and "encode" in stages and "caption" not in stages and not storage.exists(made):
        problems.append(f"encode: {missing_captions_error(made)}")


def _models(cfg: RunConfig, stages: list[str], problems: list[str]) -> None:
    needed = []
    if {"encode", "finetune", "generate", "evaluate"} & set(stages):
        needed.append(("model.pretrained", cfg.model.pretrained, cfg.model.revision))
    if "caption" in stages and not caption_stage_idle(cfg):
        needed.append(("caption.model", cfg.caption.model, cfg.caption.revision))
    for key, spec, revision in needed:
        problem = model_location_problem(spec, revision, cfg.model.hub_timeout_s)
        if problem:
            problems.append(f"{key} {spec!r}: {problem}")


def preflight(cfg: RunConfig, stages: list[str]) -> None:
    """Check every input the ``stages`` need; :class:`PreflightError` listing each problem, before any work."""
    problems: list[str] = []
    if {"caption", "encode", "train", "evaluate"} & set(stages):
        _datasets(cfg, stages, problems)
    _side_files(cfg, stages, problems)
    _models(cfg, stages, problems)
    if problems:
        raise PreflightError(f"preflight found {len(problems)} problem(s), nothing was started:\n  - "
                             + "\n  - ".join(problems))
