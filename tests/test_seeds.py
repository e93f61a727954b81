"""The seed hash is part of every output's identity: a change to it silently changes every synthetic image,
shuffle and initialisation. These pinned values catch that."""

from realfake_ray.data.labelled import seed_of
from realfake_ray.stages.generate.plan import image_seed
from realfake_ray.seeds import derive_seed


def test_pinned_values_of_the_seed_hash():
    assert derive_seed(42, "digit_0/0001.png", 0) == 2723398144731425819
    assert derive_seed(0, "kid") == 6305076094510026882
    assert image_seed(42, "digit_0/0001.png", 1) == 1091322650750146170
    assert seed_of(42, 1, 0, 3) == derive_seed(42, 1, 0, 3) & 0xFFFFFFFF


def test_seeds_are_63_bit_and_label_sensitive():
    seeds = {derive_seed(s, label, i) for s in (0, 1) for label in ("rank", "epoch") for i in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
