"""The embedded dataset: scikit-learn's bundled handwritten digits as an ImageFolder.

1,797 real 8×8 scans in 10 classes, upscaled to 32×32 RGB PNGs, with a fixed stratified train/val
split and a classes file. It is materialised once per node into the local cache, deterministically,
and addressed as ``embedded:digits/train``, ``embedded:digits/val`` and ``embedded:digits/classes.json``.

Example:
    >>> root = materialise("digits", "/tmp/realfake-cache/datasets")  # doctest: +SKIP
    >>> sorted(os.listdir(root))       # doctest: +SKIP
    ['classes.json', 'train', 'val']
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import numpy as np

__all__ = ["DATASETS", "materialise"]

DATASETS = ("digits",)
_VERSION = "v1"
_SIZE = 32
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0
_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _export_digits(root: str) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=_VAL_FRACTION, stratify=digits.target, random_state=_SPLIT_SEED
    )
    for split, idx in (("train", train_idx), ("val", val_idx)):
        for i in sorted(idx):
            label = int(digits.target[i])
            pixels = (digits.images[i] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
            image = Image.fromarray(255 - pixels, mode="L").resize((_SIZE, _SIZE), Image.BICUBIC).convert("RGB")
            class_dir = os.path.join(root, split, f"digit_{label}")
            os.makedirs(class_dir, exist_ok=True)
            image.save(os.path.join(class_dir, f"{i:04d}.png"))
    classes = {f"digit_{k}": f"digit {name}" for k, name in enumerate(_NAMES)}
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump(classes, f, indent=2)


def materialise(name: str, cache: str) -> str:
    """Local directory of embedded dataset ``name`` below the ``cache`` directory, exported on first use
    (atomic rename)."""
    if name not in DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; available: {', '.join(DATASETS)}")
    root = os.path.join(cache, f"{name}-{_VERSION}")
    if os.path.isdir(root):
        return root
    tmp = f"{root}.tmp-{uuid.uuid4().hex}"
    _export_digits(tmp)
    try:
        os.rename(tmp, root)
    except OSError:  # another process on this node won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(root):
            raise
    return root
