"""realfake filter-synthetic: label agreement on a shard (no Ray), then the tool through Ray on a fabricated set with
a classifier whose answer is known (it says "digit_3" for every image), its resume and the set it leaves for training."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import fabricate_synthetic

from realfake_ray import storage
from realfake_ray.config import ConfigError, load_config
from realfake_ray.data.labelled import synthetic_set
from realfake_ray.data.synthetic import list_shards
from realfake_ray.method.classifier import build_classifier
from realfake_ray.method.classifier_file import model_url, save_classifier
from realfake_ray.layout import RunLayout
from realfake_ray.tools.filter_synthetic.agreement import agreeing_rows, filter_counts, filtered_name, filtered_shard

CLASS_DIRS = [f"digit_{i}" for i in range(10)]


def _always(label: int, classes: int = 10) -> torch.nn.Module:
    """A resnet_tiny whose head ignores the image and answers ``label``."""
    model = build_classifier("resnet_tiny", classes).eval()
    head = list(model.children())[-1]
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(label), classes).float() * 10)
    return model


def test_a_shard_keeps_the_rows_the_classifier_labels_as_their_class_with_the_counts_in_its_footer(tmp_path):
    fabricate_synthetic(str(tmp_path), per_class=3)
    (url,) = list_shards(RunLayout(str(tmp_path)).shards_dir()).urls
    table = pq.read_table(url)
    keep = agreeing_rows(table, _always(3), 32, 1.0, "bicubic")
    assert keep.tolist() == [label == 3 for label in table.column("label").to_pylist()]
    out = filtered_shard(table, keep, url, "ab" * 32)
    assert out.num_rows == 3 and set(out.column("label").to_pylist()) == {3}
    assert out.schema.metadata[b"huggingface"] == table.schema.metadata[b"huggingface"]  # still a datasets set
    counts = filter_counts(out.schema)
    assert counts["kept"] == {"3": 3} and sum(counts["dropped"].values()) == 27 and "3" not in counts["dropped"]
    assert filtered_name(url, 3).endswith("-0000-n3.parquet") and filtered_name(url, 3).startswith("train-c00-")
    threes = table.filter(pa.array(keep))  # an undecodable image is not kept (and is no error)
    images = threes.column("image").combine_chunks()
    bad = pa.StructArray.from_arrays([pa.array([b"not a jpeg"] + images.field("bytes").to_pylist()[1:]),
                                      images.field("path")], names=["bytes", "path"])
    assert agreeing_rows(threes.set_column(0, "image", bad), _always(3), 32, 1.0, "bicubic").tolist() == [False, True, True]


@pytest.mark.e2e
def test_the_tool_filters_every_shard_once_and_leaves_a_set_train_reads(ray_cluster, tmp_path):
    out = str(tmp_path)
    fabricate_synthetic(out, copies=2, per_class=3)
    cfg = load_config(preset="tiny", out=out)
    from realfake_ray.tools.filter_synthetic.driver import run_filter_synthetic

    with pytest.raises(FileNotFoundError, match="train the real-only baseline first"):
        run_filter_synthetic(cfg)
    url = model_url(RunLayout(out).classifier_dir("real"))
    save_classifier(url, _always(3).state_dict(), {"arch": "resnet_tiny", "image_size": 32, "class_dirs": CLASS_DIRS})
    summary = run_filter_synthetic(cfg)
    assert (summary["kept"], summary["dropped"], summary["filtered_now"]) == (6, 54, 2)
    assert summary["per_class"]["digit_3"] == {"kept": 6, "dropped": 0, "kept_fraction": 1.0}
    assert summary["per_class"]["digit_0"] == {"kept": 0, "dropped": 6, "kept_fraction": 0.0}
    again = run_filter_synthetic(cfg)  # every shard is there: nothing is filtered again
    assert again["filtered_now"] == 0 and again["kept"] == 6
    filtered = synthetic_set(load_config(preset="tiny", out=out, overrides=[f"train.synthetic={summary['dest']}"]), CLASS_DIRS)
    assert filtered.sharded and filtered.num_images == 6
    assert storage.exists(storage.join(summary["dest"], "_summary.json"))
    other = ["digit_3", *CLASS_DIRS[:3], *CLASS_DIRS[4:]]
    save_classifier(url, _always(0).state_dict(), {"arch": "resnet_tiny", "image_size": 32, "class_dirs": other})
    with pytest.raises(ConfigError, match="are not the synthetic set's"):
        run_filter_synthetic(cfg)
