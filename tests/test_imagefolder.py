"""Image decoding (realfake_ray.data.imagefolder): every mode to RGB, the views, safe stems. Listing datasets and
class names: tests/test_sources.py."""

import io

import numpy as np
import pytest
from PIL import Image

from realfake_ray.data.imagefolder import decode_image, stem


def _png(mode: str, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(buf, format="PNG")
    elif mode == "CMYK":
        Image.new("CMYK", size, (0, 128, 255, 0)).save(buf, format="JPEG")
    elif mode == "P":
        Image.new("RGB", size, (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(buf, format="PNG")
    else:
        Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb_at_resolution(mode):
    pixels, width, height = decode_image(_png(mode), 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert (width, height) == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    pixels, _, _ = decode_image(_png("I;16"), 8)
    assert 150 < pixels.mean() < 160  # 40000/65535*255 ≈ 155.6


def test_transparent_pixels_composite_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(buf, format="PNG")
    pixels, _, _ = decode_image(buf.getvalue(), 10)
    assert pixels.min() == 255


def test_centre_crop_keeps_the_middle():
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # white centre band of a wide image
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    pixels, _, _ = decode_image(buf.getvalue(), 20)
    assert pixels[:, 3:17].mean() > 250


def test_corrupt_bytes_raise():
    with pytest.raises((OSError, ValueError)):
        decode_image(b"not an image", 8)


def test_stem_is_traversal_free():
    assert stem("n01/img_1.JPEG") == "img_1"
    assert stem("cls/sub/img.png").startswith("sub_img-")
    assert stem("cls/sub/img.png") != stem("cls/sub_img.png")
    s = stem("cls/../../etc/passwd.png")
    assert "/" not in s and ".." not in s
