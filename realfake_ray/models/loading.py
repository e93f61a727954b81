"""Resolve model specs to local diffusers directories and load components from them.

A spec is a local diffusers directory, a Hugging Face repo id, an fsspec URL of a diffusers directory
(copied once per node into the local cache) or ``preset:tiny`` (the pretrained tiny base shipped in the
package, written once per node into the cache in fp32).
All of them end as a local directory loaded by the same ``from_pretrained`` calls, so the tiny preset
exercises exactly the code path of SD v1.5. Offline with a hub id: a clear error, never a hang.

Example:
    >>> model_dir = resolve_model_dir("preset:tiny")
    >>> vae = load_vae(model_dir)
    >>> image_encoder, processor = load_clip_vision(model_dir)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import threading
import uuid
from urllib.parse import urlparse

from realfake_ray import storage
from realfake_ray.method.vision_token import check_vision_token_width

__all__ = [
    "PRESET_PREFIX", "PRESETS", "TINY_BASE_DIR", "ModelLoadError", "shipped_base_digest", "write_fp32_copy",
    "materialise_preset", "hub_reachable", "hub_snapshot", "resolve_model_dir", "read_component_config",
    "has_component", "clip_vision_dir", "guidance_widths", "check_models", "weights_sha256", "load_vae",
    "load_clip_vision", "load_pipeline", "load_captioner",
]

PRESET_PREFIX = "preset:"
PRESETS = ("tiny",)
TINY_BASE_DIR = os.path.join(os.path.dirname(__file__), "tiny_base")  # the shipped weights (fp16 safetensors)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# What a diffusers pipeline needs from the hub: configs, tokenizer files, safetensors weights.
_HUB_ALLOW = ["*.json", "*.txt", "*.model", "**/*.json", "**/*.txt", "**/*.safetensors", "*.safetensors"]
_HUB_IGNORE = ["safety_checker/*", "*non_ema*", "*.fp16.*", "*ema-only*", "*.ckpt", "*.bin", "*.msgpack", "*.onnx", "*.h5"]


class ModelLoadError(RuntimeError):
    """A model spec cannot be resolved or loaded; the message names the spec and what to do."""


def _atomic_fill(target: str, fill) -> str:
    """Create directory ``target`` by filling a temporary sibling and renaming it (first writer wins)."""
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex}"
    try:
        fill(tmp)
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
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
    return _atomic_fill(target, lambda tmp: write_fp32_copy(TINY_BASE_DIR, tmp))


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


def hub_snapshot(repo_id: str, revision: str | None = None, timeout_s: float = 10.0) -> str:
    """Local snapshot of a hub repo: from the HF cache if present, else downloaded (if reachable)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=repo_id, revision=revision, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE)
    try:
        return snapshot_download(local_files_only=True, **kwargs)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise _offline_error(repo_id, "HF_HUB_OFFLINE is set and it is not in the local cache")
    if not hub_reachable(timeout_s):
        host, port = _hub_endpoint()
        raise _offline_error(repo_id, f"{host}:{port} is not reachable within {timeout_s:g} s (offline?)")
    try:
        return snapshot_download(etag_timeout=timeout_s, **kwargs)
    except Exception as exc:  # auth, missing repo, network drop: all end the same way for the user
        raise _offline_error(repo_id, f"{type(exc).__name__}: {exc}") from None


def resolve_model_dir(spec: str, revision: str | None = None, timeout_s: float = 10.0) -> str:
    """A local directory for any model spec (see module docstring)."""
    if spec.startswith(PRESET_PREFIX):
        return materialise_preset(spec[len(PRESET_PREFIX) :])
    if "://" in spec and not storage.is_local(spec):
        if not storage.isdir(spec):
            raise ModelLoadError(f"model directory not found: {spec}")
        digest = hashlib.sha256(spec.rstrip("/").encode()).hexdigest()[:16]
        target = storage.cache_dir("models", f"url-{digest}")
        return _atomic_fill(target, lambda tmp: storage.copy_tree_to_local(spec, tmp))
    local = os.path.expanduser(storage.local_path(spec) if "://" in spec else spec)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if os.path.exists(local):
        raise ModelLoadError(f"model spec {spec!r} is a file; expected a diffusers/transformers directory")
    if _HUB_ID.match(spec):
        return hub_snapshot(spec, revision, timeout_s)
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
    return resolve_model_dir(clip_spec, timeout_s=timeout_s)


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
