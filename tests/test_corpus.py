"""The printed-digit corpus the tiny base is pretrained on."""

import numpy as np
import pytest

from realfake_ray.data.corpus import CLASS_NAMES, DigitCorpus, digit_fonts


def test_fonts_that_draw_no_digits_are_filtered_by_rendering():
    names = {f.path.rsplit("/", 1)[-1] for f in digit_fonts()}
    assert {"DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "cmtt10.ttf", "STIXGeneral.ttf"} <= names
    # Fonts that map the digit code points to something else: placeholder boxes, delimiters, math symbols.
    assert not names & {"LastResortHE-Regular.ttf", "cmex10.ttf", "cmsy10.ttf", "DejaVuSansDisplay.ttf"}
    styles = {f.words for f in digit_fonts()}
    assert {"sans", "bold serif", "typewriter", "italic serif"} <= styles


def test_images_are_deterministic_per_seed_and_index_and_balanced():
    a, b = DigitCorpus(seed=3), DigitCorpus(seed=3)
    for i in (0, 7, 123):
        assert np.array_equal(a[i].image, b[i].image) and a[i].caption == b[i].caption
    assert not np.array_equal(a[0].image, DigitCorpus(seed=4)[0].image)
    images, labels, captions = a.batch(range(40))
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [4] * 10
    assert len({img.tobytes() for img in images}) == 40  # no two renderings alike
    assert np.array_equal(images[:, :, :, 0], images[:, :, :, 2])  # grey, like the scans it stands in for


def test_captions_name_the_class_and_describe_the_rendering():
    corpus = DigitCorpus(seed=0)
    samples = [corpus[i] for i in range(300)]
    for s in samples:
        assert CLASS_NAMES[s.label] in s.caption
    words = " ".join(s.caption for s in samples)
    for attribute in ("dark on light", "light on dark", "tilted", "blurry", "bold", "serif", "small", "large"):
        assert attribute in words
    # Polarity in a caption is true of the picture: the ink lies on the dark side of the border colour.
    for s in samples:
        grey = s.image[:, :, 0].astype(float)
        border = np.median(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
        darkest, lightest = np.percentile(grey, 1), np.percentile(grey, 99)
        if "dark on light" in s.caption:
            assert border - darkest > lightest - border, s.caption
        if "light on dark" in s.caption:
            assert lightest - border > border - darkest, s.caption


def test_identity_changes_with_the_fonts():
    fonts = digit_fonts()
    assert DigitCorpus(0).identity() == DigitCorpus(1).identity()  # the seed is recorded separately
    assert DigitCorpus(0, fonts[:3]).identity() != DigitCorpus(0).identity()


def test_too_few_fonts_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="found 0 fonts that draw the ten digits"):
        digit_fonts(str(tmp_path))
