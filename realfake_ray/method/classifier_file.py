"""The trained classifier's file: weights as safetensors, with what it needs to be used again (arch, image
size, class folders and names, training source, epochs) as JSON in the header. Written by ``train``, read by
``evaluate`` and the tools, at any storage URL.

Example:
    >>> url = model_url("runs/tiny/classifier")
    >>> url
    'runs/tiny/classifier/model.safetensors'
    >>> save_classifier(url, model.state_dict(), {"arch": "resnet_tiny", "class_dirs": dirs, ...})  # doctest: +SKIP
    >>> model, info = load_classifier(url)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import struct

from torch import nn

from realfake_ray import storage
from realfake_ray.method.classifier import build_classifier

__all__ = ["model_url", "save_classifier", "read_classifier_info", "load_classifier"]


def model_url(cdir: str) -> str:
    """``<classifier dir>/model.safetensors`` (weights + arch, image size and classes as metadata)."""
    return storage.join(cdir, "model.safetensors")


def save_classifier(url: str, state_dict: dict, info: dict) -> None:
    """Write weights as safetensors with ``info`` (arch, image_size, class_dirs, ...) in the header."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    storage.write_bytes(url, save(tensors, metadata={k: json.dumps(v) for k, v in info.items()}))


def read_classifier_info(data: bytes) -> dict:
    """The metadata :func:`save_classifier` put in a safetensors header."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return {k: json.loads(v) for k, v in header.get("__metadata__", {}).items()}


def load_classifier(url: str) -> tuple[nn.Module, dict]:
    """``(model in eval mode, info)`` from a :func:`save_classifier` file at any URL."""
    from safetensors.torch import load

    if not storage.exists(url):
        raise FileNotFoundError(f"no trained classifier at {url} (run `realfake train` first)")
    data = storage.read_bytes(url)
    info = read_classifier_info(data)
    model = build_classifier(info["arch"], len(info["class_dirs"]))
    model.load_state_dict(load(data))
    return model.eval(), info
