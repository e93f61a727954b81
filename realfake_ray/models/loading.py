"""Resolve model specs to local diffusers directories and load components from them.

A spec is a local diffusers directory, a Hugging Face repo id, an fsspec URL of a diffusers directory
(copied once per node into the local cache) or ``preset:tiny`` (the pretrained tiny base shipped in the
package, written once per node into the cache in fp32).
All of them end as a local directory loaded by the same ``from_pretrained`` calls, so the tiny preset
exercises exactly the code path of SD v1.5. Offline with a hub id: a clear error, never a hang.

Hub downloads and URL copies fetch only what the loaders read (:func:`model_patterns`): for a pipeline
``model_index.json`` and the folders of the components it names (not the safety checker, which
:func:`load_pipeline` replaces by None), one weight format per component (the non-variant safetensors) —
never a repository's root single-file checkpoints. Several processes of one node resolving the same spec
(the actors of an 8-GPU node) download or copy it once: one holds a file lock, the others wait for it and
reuse the completed directory.

Example:
    >>> model_dir = resolve_model_dir("preset:tiny")
    >>> vae = load_vae(model_dir)
    >>> image_encoder, processor = load_clip_vision(model_dir)
"""

from __future__ import annotations

import logging
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from filelock import FileLock, Timeout
from huggingface_hub.utils import filter_repo_objects

from realfake_ray import storage
from realfake_ray.method.vision_token import check_vision_token_width

__all__ = [
    "PRESET_PREFIX", "PRESETS", "TINY_BASE_DIR", "ModelLoadError", "shipped_base_digest", "write_fp32_copy",
    "materialise_preset", "MODEL_KINDS", "NOT_LOADED", "pipeline_components", "model_patterns", "select_files",
    "hub_reachable", "hub_snapshot", "resolve_model_dir", "read_component_config",
    "has_component", "clip_vision_dir", "guidance_widths", "check_models", "weights_sha256", "load_vae",
    "load_clip_vision", "load_pipeline", "load_captioner", "model_location_problem",
]

log = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
PRESETS = ("tiny",)
TINY_BASE_DIR = os.path.join(os.path.dirname(__file__), "tiny_base")  # the shipped weights (fp16 safetensors)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
MODEL_KINDS = ("pipeline", "clip_vision", "transformers")
# Pipeline components load_pipeline does not read from disk (it passes safety_checker=None).
NOT_LOADED = frozenset({"safety_checker"})
_CONFIGS = ("*.json", "*.txt", "*.model")  # configs, tokenizer vocabularies and merges, sentencepiece models
_WEIGHTS = "*.safetensors"
# Variants: name.fp16.safetensors, name.non_ema.safetensors, name.fp16-00001-of-00002.safetensors. Plain names
# (name.safetensors, name-00001-of-00002.safetensors) have no dot before the extension.
_VARIANT_WEIGHTS = "*.*.safetensors"
# CLIPVisionModelWithProjection (config + weights, possibly sharded) and CLIPImageProcessor, at the root of a
# transformers repo or in a pipeline's image_encoder / feature_extractor folders.
_CLIP_VISION = [f"{folder}{name}" for folder in ("", "image_encoder/")
                for name in ("config.json", "model.safetensors", "model-*.safetensors", "model.safetensors.index.json")]
_CLIP_VISION += ["preprocessor_config.json", "feature_extractor/preprocessor_config.json"]
_COMPLETE = ".realfake-complete"  # written last into a cache directory filled by _fill_once


class ModelLoadError(RuntimeError):
    """A model spec cannot be resolved or loaded; the message names the spec and what to do."""


@contextmanager
def _node_lock(target: str, what: str) -> Iterator[None]:
    """Hold the file lock ``<target>.lock`` (one process of the node at a time); a waiter says once that it waits.
    The lock goes with its holder: a crashed process never leaves it taken."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    lock = FileLock(f"{target}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info(f"waiting for another process of this node to finish {what}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _complete(target: str) -> bool:
    return os.path.isfile(os.path.join(target, _COMPLETE))


def _fill_once(target: str, fill: Callable[[str], object], what: str) -> str:
    """Directory ``target`` filled once per node by ``fill(tmp)``: under the node lock, into a temporary sibling
    that gets the completion marker last and is then renamed. Others wait and reuse it; a directory without the
    marker (an interrupted fill) is never used but filled again."""
    if _complete(target):
        return target
    with _node_lock(target, what):
        if _complete(target):
            return target  # filled by the process we waited for
        for stale in [target, *glob.glob(f"{glob.escape(target)}.tmp-*")]:  # interrupted fills; nobody else fills now
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            fill(tmp)
            with open(os.path.join(tmp, _COMPLETE), "w") as marker:
                marker.write(f"{what}\n")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def shipped_base_digest(directory: str = TINY_BASE_DIR) -> str:
    """sha256 (first 16 hex digits) of the shipped base's weights: its per-node cache key."""
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ModelLoadError(
            f"the tiny base model is missing from {directory} (a source checkout without its weights?); "
            "rebuild it with `realfake pretrain-base --out DIR` and pass --set model.pretrained=DIR"
        )
    digest = hashlib.sha256()
    for component in sorted(os.listdir(directory)):
        if os.path.isdir(os.path.join(directory, component)):
            digest.update(component.encode() + weights_sha256(os.path.join(directory, component)).encode())
    return digest.hexdigest()[:16]


def write_fp32_copy(source: str, target: str) -> str:
    """The diffusers pipeline at ``source`` saved to ``target`` in fp32 (with its model card and record)."""
    import torch

    pipe = load_pipeline(source, torch_dtype=torch.float32)
    pipe.save_pretrained(target, safe_serialization=True)
    for name in ("training.json", "README.md"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(target, name))
    return target


def materialise_preset(name: str) -> str:
    """Local directory of a built-in preset pipeline: the shipped base in fp32, written once per node."""
    if name not in PRESETS:
        raise ModelLoadError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    target = storage.cache_dir("models", f"preset-{name}-{shipped_base_digest()}")
    return _fill_once(target, lambda tmp: write_fp32_copy(TINY_BASE_DIR, tmp), f"writing preset:{name}")


def pipeline_components(model_index: dict) -> list[str]:
    """The component folders a pipeline's ``model_index.json`` names (``[library, class]`` entries; ``[null,
    null]`` is an absent component) that :func:`load_pipeline` reads, sorted.

    Example:
        >>> pipeline_components({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        ...                      "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
        ...                      "image_encoder": [None, None], "requires_safety_checker": True})
        ['unet']
    """
    return sorted(name for name, value in model_index.items()
                  if not name.startswith("_") and isinstance(value, list) and len(value) == 2
                  and value[0] is not None and name not in NOT_LOADED)


def _unknown_kind(kind: str) -> ValueError:
    return ValueError(f"unknown model kind {kind!r}; one of {', '.join(MODEL_KINDS)}")


def model_patterns(kind: str, model_index: dict | None = None) -> tuple[list[str], list[str]]:
    """``(allow, ignore)`` patterns (huggingface_hub's, see :func:`select_files`) of the files a loader reads.

    ``pipeline``: ``model_index.json`` and, per component it names (:func:`pipeline_components`), its configs,
    tokenizer files and non-variant safetensors weights. ``clip_vision``: what CLIPVisionModelWithProjection and
    CLIPImageProcessor read. ``transformers`` (e.g. the captioner): the root configs, tokenizer files and
    non-variant safetensors weights. Never ``.bin``/``.ckpt``/``.msgpack``/``.h5``/``.onnx`` (our loaders read
    safetensors only) nor a repository's root single-file checkpoints.

    Example:
        >>> model_patterns("pipeline", {"vae": ["diffusers", "AutoencoderKL"]})
        (['model_index.json', 'vae/*.json', 'vae/*.txt', 'vae/*.model', 'vae/*.safetensors'], ['*.*.safetensors'])
    """
    if kind == "pipeline":
        if model_index is None:
            raise ValueError("model_patterns('pipeline') needs the pipeline's model_index.json")
        allow = ["model_index.json"] + [f"{c}/{p}" for c in pipeline_components(model_index) for p in (*_CONFIGS, _WEIGHTS)]
    elif kind == "clip_vision":
        allow = list(_CLIP_VISION)
    elif kind == "transformers":
        allow = [*_CONFIGS, _WEIGHTS]
    else:
        raise _unknown_kind(kind)
    return allow, [_VARIANT_WEIGHTS]


def select_files(files: list[str], kind: str, model_index: dict | None = None) -> list[str]:
    """The repo-relative ``files`` a loader of ``kind`` reads, matched as ``huggingface_hub`` matches
    ``snapshot_download``'s patterns (``filter_repo_objects``: fnmatch, ``*`` crosses ``/``).

    Example:
        >>> select_files(["model_index.json", "v1-5-pruned.safetensors", "vae/config.json",
        ...               "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"],
        ...              "pipeline", {"vae": ["diffusers", "AutoencoderKL"]})
        ['model_index.json', 'vae/config.json', 'vae/diffusion_pytorch_model.safetensors']
    """
    allow, ignore = model_patterns(kind, model_index)
    return list(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))


def _hub_endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable(timeout_s: float) -> bool:
    """True when a TCP connection to the hub opens within ``timeout_s`` (DNS included)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(_hub_endpoint(), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return bool(result and result[0])


def _offline_error(repo_id: str, reason: str) -> ModelLoadError:
    return ModelLoadError(
        f"cannot download {repo_id!r} from the Hugging Face Hub: {reason}. Pass a local diffusers "
        f"directory or an fsspec URL instead (e.g. --set model.pretrained=/models/sd-v1-5 or "
        f"s3://bucket/sd-v1-5), or pre-download it into the Hugging Face cache."
    )


def _hub_fetch(repo_id: str, revision: str | None, kind: str, **kwargs) -> str:
    """``snapshot_download`` of what a ``kind`` loader reads (a pipeline's ``model_index.json`` first)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    model_index = None
    if kind == "pipeline":
        with open(hf_hub_download(repo_id, "model_index.json", revision=revision, **kwargs)) as f:
            model_index = json.load(f)
    allow, ignore = model_patterns(kind, model_index)
    return snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore, **kwargs)


def hub_snapshot(repo_id: str, revision: str | None = None, timeout_s: float = 10.0, kind: str = "pipeline") -> str:
    """Local snapshot of what a ``kind`` loader reads from a hub repo (:func:`model_patterns`): from the HF cache
    if complete there, else downloaded (if reachable) by one process of the node while the others wait."""
    from huggingface_hub.errors import EntryNotFoundError

    with _node_lock(storage.cache_dir("models", f"hub-{storage.safe_name(repo_id)}"), f"downloading {repo_id}"):
        try:  # huggingface_hub downloads each file to a temporary name; an incomplete snapshot raises here
            return _hub_fetch(repo_id, revision, kind, local_files_only=True)
        except (EntryNotFoundError, OSError):
            pass
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise _offline_error(repo_id, "HF_HUB_OFFLINE is set and it is not in the local cache")
        if not hub_reachable(timeout_s):
            host, port = _hub_endpoint()
            raise _offline_error(repo_id, f"{host}:{port} is not reachable within {timeout_s:g} s (offline?)")
        try:
            return _hub_fetch(repo_id, revision, kind, etag_timeout=timeout_s)
        except EntryNotFoundError as exc:
            what = "no model_index.json: not a diffusers pipeline" if kind == "pipeline" else f"a file is missing ({exc})"
            raise ModelLoadError(f"{repo_id!r}: {what}") from None
        except Exception as exc:  # auth, missing repo, network drop: all end the same way for the user
            raise _offline_error(repo_id, f"{type(exc).__name__}: {exc}") from None


def _copy_model(url: str, target: str, kind: str) -> None:
    """Copy what a ``kind`` loader reads from the directory at ``url`` (ranged parallel reads)."""
    files = [storage.relative(u, url) for u in storage.find(url)]
    model_index = None
    if kind == "pipeline":
        if "model_index.json" not in files:
            raise ModelLoadError(f"{url}: no model_index.json (not a diffusers pipeline directory)")
        model_index = storage.read_json(storage.join(url, "model_index.json"))
    selected = select_files(files, kind, model_index)
    if not any(f.endswith(".safetensors") for f in selected):
        raise ModelLoadError(f"{url}: no safetensors weights a {kind} loader reads (found: {', '.join(files[:8])})")
    storage.copy_tree_to_local(url, target, selected)


def resolve_model_dir(spec: str, revision: str | None = None, timeout_s: float = 10.0, kind: str = "pipeline") -> str:
    """A local directory for any model spec (see module docstring); ``kind`` (:data:`MODEL_KINDS`) says which
    files a hub download or URL copy needs (:func:`model_patterns`)."""
    if kind not in MODEL_KINDS:
        raise _unknown_kind(kind)
    if spec.startswith(PRESET_PREFIX):
        return materialise_preset(spec[len(PRESET_PREFIX) :])
    if "://" in spec and not storage.is_local(spec):
        if not storage.isdir(spec):
            raise ModelLoadError(f"model directory not found: {spec}")
        digest = hashlib.sha256(f"{spec.rstrip('/')}|{kind}".encode()).hexdigest()[:16]
        target = storage.cache_dir("models", f"url-{digest}")
        return _fill_once(target, lambda tmp: _copy_model(spec, tmp, kind), f"copying {spec}")
    local = os.path.expanduser(storage.local_path(spec) if "://" in spec else spec)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ModelLoadError(f"model spec {spec!r} is a file; expected a diffusers/transformers directory")
    if _HUB_ID.match(spec):
        return hub_snapshot(spec, revision, timeout_s, kind)
    raise ModelLoadError(f"model spec {spec!r}: no such directory, and not a Hugging Face repo id (org/name)")


def read_component_config(model_dir: str, component: str) -> dict:
    """The JSON config of one pipeline component (no weights loaded)."""
    path = os.path.join(model_dir, component, "config.json")
    if not os.path.exists(path):
        raise ModelLoadError(f"{model_dir}: missing {component}/config.json (not a diffusers pipeline directory?)")
    with open(path) as f:
        return json.load(f)


def has_component(model_dir: str, component: str) -> bool:
    return os.path.exists(os.path.join(model_dir, component, "config.json"))


def clip_vision_dir(model_dir: str, clip_spec: str, timeout_s: float = 10.0) -> str:
    """Where the guidance-token CLIP vision model lives: the pipeline's ``image_encoder`` or ``clip_spec``."""
    if has_component(model_dir, "image_encoder"):
        return os.path.join(model_dir, "image_encoder")
    return resolve_model_dir(clip_spec, timeout_s=timeout_s, kind="clip_vision")


def _processor_dir(clip_dir: str) -> str:
    sibling = os.path.join(os.path.dirname(clip_dir), "feature_extractor")
    if os.path.basename(clip_dir) == "image_encoder" and os.path.isdir(sibling):
        return sibling
    return clip_dir


def guidance_widths(model_dir: str, clip_dir: str) -> tuple[int, int]:
    """(text encoder hidden size, CLIP image projection width), read from configs only."""
    text_width = int(read_component_config(model_dir, "text_encoder")["hidden_size"])
    with open(os.path.join(clip_dir, "config.json")) as f:
        clip_cfg = json.load(f)
    return text_width, int(clip_cfg["projection_dim"])


def check_models(model_dir: str, clip_dir: str) -> dict:
    """Validate a pipeline + CLIP pair before work starts; returns a small identity record."""

    for component in ("vae", "unet", "text_encoder"):
        read_component_config(model_dir, component)
    check_vision_token_width(*guidance_widths(model_dir, clip_dir))
    vae_cfg = read_component_config(model_dir, "vae")
    return {
        "model_dir": model_dir,
        "clip_dir": clip_dir,
        "scaling_factor": float(vae_cfg.get("scaling_factor", 0.18215)),
        "latent_channels": int(vae_cfg["latent_channels"]),
        "vae_downsample": 2 ** (len(vae_cfg["block_out_channels"]) - 1),
        "vae_sha256": weights_sha256(os.path.join(model_dir, "vae")),
    }


def weights_sha256(directory: str) -> str:
    """sha256 over the safetensors files of a component directory (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def load_vae(model_dir: str, torch_dtype=None):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=torch_dtype, use_safetensors=True)


def load_clip_vision(clip_dir: str, torch_dtype=None):
    """``(CLIPVisionModelWithProjection, CLIPImageProcessor)`` from a directory."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if os.path.isdir(os.path.join(clip_dir, "image_encoder")):
        clip_dir = os.path.join(clip_dir, "image_encoder")
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir, torch_dtype=torch_dtype, use_safetensors=True)
    processor = CLIPImageProcessor.from_pretrained(_processor_dir(clip_dir))
    return model.eval(), processor


def load_pipeline(model_dir: str, torch_dtype=None):
    """Stock ``StableDiffusionPipeline.from_pretrained`` without the safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        model_dir,
        torch_dtype=torch_dtype,
        safety_checker=None,
        requires_safety_checker=False,
        use_safetensors=True,
    )


def load_captioner(model_dir: str, torch_dtype=None):
    """``(model, processor)`` of an image-to-text model directory (BLIP-2: ``Blip2ForConditionalGeneration``
    and ``Blip2Processor``, through the Auto classes), safetensors weights only, in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelLoadError(f"{model_dir}: no config.json (not a transformers image-to-text model directory?)")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True)
    return model.eval(), AutoProcessor.from_pretrained(model_dir)


def model_location_problem(spec: str, revision: str | None = None, timeout_s: float = 10.0) -> str | None:
    """What is wrong with a model spec, found without downloading or loading anything (None: it can be
    resolved): a missing directory or ``model_index.json``, a hub id neither cached nor reachable."""
    if spec.startswith(PRESET_PREFIX):
        name = spec[len(PRESET_PREFIX) :]
        return None if name in PRESETS else f"unknown preset {name!r} (presets: {', '.join(PRESETS)})"
    if "://" in spec and not storage.is_local(spec):
        try:
            found = storage.isdir(spec)
        except Exception as exc:  # unreachable storage: named, not raised from deep inside a stage
            return f"{type(exc).__name__}: {exc}"
        return None if found else "no such directory"
    local = os.path.expanduser(storage.local_path(spec) if "://" in spec else spec)
    if os.path.isdir(local):
        return None
    if os.path.exists(local):
        return "is a file; expected a diffusers/transformers directory"
    if not _HUB_ID.match(spec):
        return "no such directory, and not a Hugging Face repo id (org/name)"
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=spec, revision=revision, local_files_only=True, allow_patterns=["*.json"])
        return None
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    if not hub_reachable(timeout_s):
        host, port = _hub_endpoint()
        return f"not in the local Hugging Face cache, and {host}:{port} is not reachable (offline?)"
    return None
