"""Captions files (realfake_ray.data.captions): read by Arrow, bad ones named; which file encode reads."""

import pytest

from realfake_ray.config import load_config
from realfake_ray.data.captions import caption_stage_idle, read_captions, training_captions_url
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.layout import RunLayout


def test_a_captions_file_is_read_and_a_bad_one_is_named(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"image_id": "a/1.png", "caption": "a fish", "extra": 1}\n{"image_id": "b/2.png", "caption": ""}\n')
    assert read_captions(str(good)).to_pylist() == [{"image_id": "a/1.png", "caption": "a fish"},
                                                    {"image_id": "b/2.png", "caption": ""}]
    with pytest.raises(DatasetError, match="captions file not found: .*nope.jsonl"):
        read_captions(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": 1}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: expected \{\"image_id\": ..., \"caption\": ...\} records"):
        read_captions(str(bad))
    bad.write_text("image_id,caption\n")
    with pytest.raises(DatasetError, match="bad.jsonl: not JSON lines"):
        read_captions(str(bad))


def test_encode_reads_the_given_file_else_the_caption_stage_s_else_none(tmp_path):
    out = str(tmp_path / "run")
    on = load_config(out=out, data__train=str(tmp_path))  # captioning on by default: the caption stage's JSONL
    assert caption_stage_idle(on) is None and training_captions_url(on) == RunLayout(out).captions_url()
    given = load_config(out=out, data__train=str(tmp_path), overrides=["data.captions_file=s3://b/c.jsonl"])
    assert training_captions_url(given) == "s3://b/c.jsonl" and caption_stage_idle(given).startswith("data.captions_file")
    off = load_config(out=out, data__train=str(tmp_path), overrides=["caption.enabled=false"])
    assert training_captions_url(off) is None and caption_stage_idle(off) == "caption.enabled is off"
