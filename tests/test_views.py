"""Unit tests for realfake_ray.data.views: the classifier's train and eval views (numpy/PIL, checked against
torchvision's transforms)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from realfake_ray.data.views import TrainView, colour_jitter, eval_view, random_crop_box


def _images(b: int = 4, h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _photo(w: int = 400, h: int = 300) -> Image.Image:
    """A smooth RGB image (gradients), so resampling differences stay small and crops differ visibly."""
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1).astype(np.uint8))


def test_random_crop_box_follows_random_resized_crop() -> None:
    rng = np.random.default_rng(0)
    scale = (0.08, 1.0)
    for _ in range(200):
        left, top, w, h = random_crop_box(400, 300, scale, rng)
        assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
        assert scale[0] * 0.9 <= w * h / (400 * 300) <= 1.0 and 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert random_crop_box(1000, 10, (0.9, 1.0), rng) == (493, 0, 13, 10)  # no draw fits: clamped centre crop


def test_train_view_is_seeded_per_image_and_flips() -> None:
    image = _photo()
    view = TrainView(32)
    a = view(image, np.random.default_rng(0))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, view(image, np.random.default_rng(0)))
    views = [view(image, np.random.default_rng(seed)) for seed in range(1, 9)]
    assert len({v.tobytes() for v in views}) == 8  # every seed its own crop
    flipped = [bool(v[:, 0, 0].mean() > v[:, -1, 0].mean()) for v in views]  # red rises left → right unless flipped
    assert any(flipped) and not all(flipped)
    unflipped = [TrainView(32, hflip=False)(image, np.random.default_rng(seed)) for seed in range(1, 9)]
    assert not any(bool(v[:, 0, 0].mean() > v[:, -1, 0].mean()) for v in unflipped)


def test_train_view_interpolation_and_colour_jitter_follow_the_rng() -> None:
    image = _photo()
    rng_draws = [TrainView(64, (1.0, 1.0), "random", False)(image, np.random.default_rng(s)) for s in range(12)]
    bilinear = TrainView(64, (1.0, 1.0), "bilinear", False)(image, np.random.default_rng(0))
    bicubic = TrainView(64, (1.0, 1.0), "bicubic", False)(image, np.random.default_rng(0))
    kinds = {"bilinear" if np.array_equal(v, bilinear) else "bicubic" if np.array_equal(v, bicubic) else "?"
             for v in rng_draws}  # scale (1, 1): the crop is the whole image, only the resampling varies
    assert kinds == {"bilinear", "bicubic"}
    plain = TrainView(32, (1.0, 1.0), "bilinear", False)(image, np.random.default_rng(3))
    jittered = TrainView(32, (1.0, 1.0), "bilinear", False, 0.4)(image, np.random.default_rng(3))
    assert not np.array_equal(plain, jittered)
    same = colour_jitter(Image.fromarray(plain), 0.4, np.random.default_rng(5))
    assert np.array_equal(np.array(same), np.array(colour_jitter(Image.fromarray(plain), 0.4, np.random.default_rng(5))))
    assert np.array_equal(np.array(colour_jitter(Image.fromarray(plain), 0.0, np.random.default_rng(5))), plain)


def test_eval_view_is_the_standard_resize_and_centre_crop() -> None:
    image = _photo()
    view = eval_view(image, 224)
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])(
        torch.from_numpy(np.array(image)).permute(2, 0, 1)
    ).permute(1, 2, 0).numpy()
    assert view.shape == (224, 224, 3)
    assert np.abs(view.astype(int) - reference.astype(int)).mean() < 1.0
    reference_recipe = eval_view(image, 224, 0.95, "bicubic")  # timm at crop_pct 0.95: short side 235, crop 224
    expected = v2.Compose([v2.Resize(235, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(224)])(
        torch.from_numpy(np.array(image)).permute(2, 0, 1)
    ).permute(1, 2, 0).numpy()
    assert np.abs(reference_recipe.astype(int) - expected.astype(int)).mean() < 1.5
    small = eval_view(Image.fromarray(_images(1, 32, 32)[0]), 32, crop_pct=1.0)  # digits: the 32-px image as it is
    assert np.array_equal(small, _images(1, 32, 32)[0])


def test_colour_jitter_equals_torchvisions_colour_ops_on_pil_images() -> None:
    image = _photo(64, 48)
    ours = colour_jitter(image, 0.4, np.random.default_rng(7))
    rng = np.random.default_rng(7)  # the same draws: factors in [0.6, 1.4], then their order
    factors, order = rng.uniform(0.6, 1.4, 3), rng.permutation(3)
    expected = image
    for i in order:
        expected = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)[i](expected, float(factors[i]))
    assert np.array_equal(np.array(ours), np.array(expected))


def test_the_decode_tasks_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, realfake_ray.data.labelled; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # a Ray Data decode worker skips torch's import (4-8 s of CPU here)
