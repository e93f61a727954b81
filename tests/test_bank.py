"""The latent bank's own helpers (no Ray)."""

import numpy as np
import pyarrow as pa

from realfake_ray import storage
from realfake_ray._internal.shards import read_parts, write_part
from realfake_ray.bank import read_bank, write_train_subset
from realfake_ray.layout import RunLayout


def test_a_train_subset_is_a_complete_bank_of_the_selected_rows(tmp_path):
    src, dst = RunLayout(str(tmp_path / "run")), str(tmp_path / "subset")
    train = pa.table({"image_id": [f"digit_{i % 2}/{i}.png" for i in range(6)], "label": [i % 2 for i in range(6)]})
    write_part(src.bank_dir("train"), train)
    storage.write_json(storage.join(src.bank_dir(), "_identity.json"), {"vae_sha256": "abc"})
    storage.write_json(src.meta_url(), {"class_dirs": ["digit_0", "digit_1"],
                                        "splits": {"train": {"rows": 6, "root": "data/train"}, "val": {"rows": 2}}})
    write_train_subset(src.out, dst, train, np.array([True, False, True, True, False, False]))
    meta, files = read_bank(dst)
    assert read_parts(RunLayout(dst).bank_dir("train"))["image_id"].to_pylist() == ["digit_0/0.png", "digit_0/2.png",
                                                                                  "digit_1/3.png"]
    assert meta["splits"] == {"train": {"rows": 3, "root": "data/train"}} and meta["class_dirs"] == ["digit_0", "digit_1"]
    assert storage.read_json(storage.join(RunLayout(dst).bank_dir(), "_identity.json")) == {"vae_sha256": "abc"}
