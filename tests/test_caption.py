"""Caption stage: what it decides without Ray, then end to end with a config-built tiny BLIP-2 (random weights,
an offline tokenizer) on a few dozen embedded digits, into encode's planned rows."""

import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import forbid_ray_work, record_plan

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, read_parts, write_part
from realfake_ray.config import ConfigError, load_config
from realfake_ray.data.captions import caption_stage_idle
from realfake_ray.data.labelled import read_pending_shards, real_set
from realfake_ray.layout import RunLayout
from realfake_ray.models.loading import TINY_BASE_DIR
from realfake_ray.stages.caption.driver import build_pipeline, run_caption
from realfake_ray.stages.caption.plan import PARTS, pending_rows
from realfake_ray.stages.caption.workers import (
    Captioner,
    clean_caption,
    decode_batch,
    write_caption_batch,
    write_captions_jsonl,
)
from realfake_ray.stages.encode import driver as encode
from realfake_ray.stages.pipeline import select_stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN1K = os.path.join(REPO, "jobs", "configs", "in1k.yaml")
IMAGE_SIZE = 32  # the tiny BLIP-2's vision tower input; the digits are 32 px too


def build_tiny_blip2(path: str) -> str:
    """A BLIP-2 (ViT → Q-Former → OPT) of a few thousand random weights and its processor, saved as a transformers
    directory: BlipImageProcessor + the tiny base's offline CLIP tokenizer, nothing downloaded. The weights are
    drawn wide (std 0.5) so that the captions depend on the image, and every token that does not decode to a word
    of letters gets a zero embedding (its logit is 0, below the best word's): captions are readable words."""
    import torch
    from transformers import AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(TINY_BASE_DIR, "tokenizer"))
    processor = Blip2Processor(BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer,
                               num_query_tokens=4)  # adds the "<image>" token to the tokenizer
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, initializer_range=0.5)
    config = Blip2Config(
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        qformer_config={**tower, "encoder_hidden_size": 32, "vocab_size": len(tokenizer)},
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                         word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=len(tokenizer), init_std=0.5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        num_query_tokens=4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    words = torch.tensor([bool(re.fullmatch(r"[a-z]{3,}", tokenizer.decode([i]).strip())) for i in range(len(tokenizer))])
    words[tokenizer.all_special_ids] = False
    with torch.no_grad():
        model.get_input_embeddings().weight[~words] = 0  # tied with the output layer
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory) -> str:
    return build_tiny_blip2(str(tmp_path_factory.mktemp("blip2")))


@pytest.fixture
def few_digits(tmp_path) -> str:
    """3 embedded train digits per class (30 images) and one undecodable file."""
    source, data = storage.resolve_embedded("embedded:digits/train"), tmp_path / "digits"
    for folder in sorted(os.listdir(source)):
        (data / folder).mkdir(parents=True)
        for name in sorted(os.listdir(os.path.join(source, folder)))[:3]:
            shutil.copy(os.path.join(source, folder, name), data / folder / name)
    (data / "digit_7" / "broken.png").write_bytes(b"\x89PNG not really")
    return str(data)


def _config(out, data, model, *overrides):
    return load_config(preset="tiny", out=str(out), data__train=data, overrides=[
        "data.classes_file=embedded:digits/classes.json", "caption.enabled=true", f"caption.model={model}",
        f"caption.image_size={IMAGE_SIZE}", "caption.max_tokens=5", "caption.batch_size=8", "caption.rows_per_file=8",
        *overrides])


def _jsonl(out) -> dict[str, str]:
    lines = storage.read_text(RunLayout(str(out)).captions_url()).splitlines()
    captions = {json.loads(line)["image_id"]: json.loads(line)["caption"] for line in lines}
    assert len(captions) == len(lines)  # one line per image
    return captions


def _direct_captions(model_dir: str, urls: list[str]) -> list[str]:
    """The captions of ``urls`` straight from transformers, one image at a time (no stage code)."""
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor, model = Blip2Processor.from_pretrained(model_dir), Blip2ForConditionalGeneration.from_pretrained(model_dir)
    found = []
    for url in urls:
        with torch.no_grad():
            ids = model.generate(**processor(images=Image.open(url).convert("RGB"), return_tensors="pt"), max_new_tokens=5)
        found.append(processor.batch_decode(ids, skip_special_tokens=True)[0].strip())
    return found


def _previous_run(cfg) -> dict[str, str]:
    """What a run of the stage writes before its JSONL — part files of (image_id, caption, error), 8 rows each —
    made in-process with the stage's own tasks and workers (no Ray); returns the captions it wrote."""
    lset = real_set(cfg.data.train, cfg)
    rows, captioner = pending_rows(lset, cfg.out), Captioner(cfg)
    for start in range(0, rows.num_rows, 8):
        chunk = rows.slice(start, 8)
        if lset.sharded:  # the read task of a sharded set: the pending rows' bytes from their shard
            chunk = read_pending_shards(chunk, layout=lset.layout, root=lset.url, label_map=lset.label_map)
        batch = {k: np.array(chunk[k].to_pylist(), dtype=object) for k in chunk.column_names}
        write_caption_batch(pa.table(captioner(decode_batch(batch, IMAGE_SIZE))), cfg.out)
    table = read_parts(RunLayout(cfg.out).captions_dir(PARTS))
    return {r["image_id"]: r["caption"] for r in table.to_pylist() if not r["error"]}


# ------------------------------------------------------------------------------------------ no Ray


def test_the_stage_runs_only_when_it_has_work(tmp_path, no_ray):
    tiny = load_config(preset="tiny", out=str(tmp_path))
    assert caption_stage_idle(tiny) == "caption.enabled is off" and "caption" not in select_stages(cfg=tiny)
    assert run_caption(tiny) == {"skipped": True, "reason": "caption.enabled is off"}
    on = load_config(preset="tiny", out=str(tmp_path), overrides=["caption.enabled=true"])
    assert caption_stage_idle(on) is None and select_stages(cfg=on)[:2] == ["caption", "encode"]
    given = load_config(preset="tiny", out=str(tmp_path), overrides=["caption.enabled=true",
                                                                     "data.captions_file=s3://bucket/c.jsonl"])
    assert run_caption(given)["reason"] == "data.captions_file is given (s3://bucket/c.jsonl)"
    assert select_stages(cfg=given)[0] == "encode"
    assert select_stages(only=["caption"], cfg=tiny) == ["caption"]  # named: it runs (and says why it has nothing to do)
    assert select_stages(from_stage="encode", cfg=on)[0] == "encode"
    assert not storage.exists(RunLayout(str(tmp_path)).captions_dir())


def test_in1k_config_works_with_and_without_a_captions_file(tmp_path, no_ray):
    without = load_config(config_file=IN1K, out="s3://bucket/run")
    assert without.data.captions_file is None and without.caption.enabled
    assert without.caption.model == "Salesforce/blip2-opt-2.7b" and without.caption.actors.gpus_per_actor == 1
    assert select_stages(cfg=without)[:2] == ["caption", "encode"]  # BLIP-2 captions every training image
    assert without.data.classes_file == "imagenet1k"  # the shipped names, not a path below the working directory
    assert load_config(data__train="imagenet1k").data.train == os.path.abspath("imagenet1k")  # a dataset path is one
    given = load_config(config_file=IN1K, out=str(tmp_path), overrides=["data.captions_file=s3://bucket/c.jsonl"])
    assert select_stages(cfg=given)[0] == "encode" and run_caption(given)["skipped"]  # holding the run's lease


def test_the_encode_stage_s_caption_keys_are_refused_naming_the_caption_section():
    """Every old key is refused (tests/test_config.py); one that moved to another section says so."""
    with pytest.raises(ConfigError, match=r"encode.captioner: this key was renamed and moved \(caption.model\)"):
        load_config(preset="tiny", overrides=["encode.captioner=Salesforce/blip2-opt-2.7b"])
    with pytest.raises(ConfigError, match=r"generate.accelerator: this key was renamed to 'speedup'"):
        load_config(preset="tiny", overrides=["generate.accelerator=none"])


def test_encode_without_captions_names_the_caption_stage_before_any_work(tmp_path, few_digits, no_ray):
    cfg = load_config(out=str(tmp_path), data__train=few_digits)  # captioning on (the default), no captions yet
    with pytest.raises(ValueError, match=r"no captions yet: .*captions/captions.jsonl does not exist; run the "
                                         r"caption stage first \(`realfake caption`"):
        encode.run_encode(cfg)


def test_decode_marks_unreadable_images_and_captions_are_one_line(tmp_path, few_digits):
    urls = [os.path.join(few_digits, "digit_7", "broken.png"), os.path.join(few_digits, "digit_0", "0000.png")]
    batch = decode_batch({"url": np.array(urls, dtype=object), "image_id": np.array(["b", "a"], dtype=object)}, 16)
    assert batch["pixels"].shape == (2, 16, 16, 3) and batch["error"][0].startswith("UnidentifiedImageError")
    assert batch["error"][1] == "" and batch["pixels"][1].any()
    assert clean_caption("  a dog\n on \t grass ") == "a dog on grass"


def test_the_captioner_captions_readable_images_and_skips_the_others(tmp_path, tiny_blip2, few_digits):
    cfg = _config(tmp_path, few_digits, tiny_blip2)
    urls = [os.path.join(few_digits, "digit_0", "0000.png"), os.path.join(few_digits, "digit_7", "broken.png")]
    batch = decode_batch({"url": np.array(urls, dtype=object), "image_id": np.array(urls, dtype=object)}, IMAGE_SIZE)
    out = Captioner(cfg)(batch)
    assert sorted(out) == ["caption", "error", "image_id"] and list(out["image_id"]) == urls
    assert re.fullmatch(r"[a-z]+( [a-z]+)*", out["caption"][0]) and out["caption"][1] == ""


def test_captions_made_with_other_settings_are_refused_before_any_work(tmp_path, few_digits, no_ray):
    cfg = _config(tmp_path, few_digits, "Salesforce/blip2-opt-2.7b")
    storage.write_json(RunLayout(cfg.out).captions_dir("_settings.json"),
                       {"model": "Salesforce/blip2-opt-2.7b", "revision": None, "max_tokens": 30, "image_size": 32})
    with pytest.raises(ValueError, match=r"captions at .* was made with other settings \(max_tokens: 30 → 5\)"):
        run_caption(cfg)


def test_the_captioner_has_its_own_pool_sized_by_caption_actors(tmp_path, few_digits, monkeypatch, no_ray):
    recorder = record_plan(monkeypatch)
    cfg = _config(tmp_path, few_digits, "Salesforce/blip2-opt-2.7b", "caption.actors.min_size=2",
                  "caption.actors.max_size=64", "caption.actors.gpus_per_actor=1", "encode.actors.max_size=3")
    lset = real_set(cfg.data.train, cfg)
    build_pipeline(lset, pending_rows(lset, cfg.out), cfg)
    assert [name for name, _ in recorder.steps] == ["decode_batch", "Captioner", "write_caption_batch"]
    pool = recorder.pools()["Captioner"]
    assert (pool.min_size, pool.initial_size, pool.max_size) == (2, 64, 64)  # all of caption.actors, none of encode's


def _parquet_digits(root, few_digits: str) -> dict[str, str]:
    """The first digit of each class of ``few_digits`` as one Hugging Face Parquet shard; ``{image_id: file}``."""
    import datasets

    classes = sorted(os.listdir(few_digits))
    files = [os.path.join(few_digits, c, sorted(os.listdir(os.path.join(few_digits, c)))[0]) for c in classes]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    rows = {"image": [{"bytes": open(f, "rb").read(), "path": None} for f in files], "label": list(range(len(classes)))}
    root.mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "train-0.parquet"))
    return {f"train-0.parquet#{i}": f for i, f in enumerate(files)}


def test_a_sharded_training_set_is_captioned_under_its_shard_row_ids(tmp_path, tiny_blip2, few_digits):
    """Any layout encode reads, the caption stage reads the same way: a Parquet shard's rows are captioned under the
    ids encode gives them (``<shard>#<row>``), each as transformers captions the same image from its file."""
    files = _parquet_digits(tmp_path / "hf", few_digits)
    cfg = _config(tmp_path / "run", str(tmp_path / "hf"), tiny_blip2)
    made = _previous_run(cfg)
    assert sorted(made) == sorted(files)
    some = sorted(files)[::3]
    assert [made[i] for i in some] == _direct_captions(tiny_blip2, [files[i] for i in some])
    assert write_captions_jsonl(cfg.out)["captions"] == len(files) and _jsonl(cfg.out) == made


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.e2e
@pytest.mark.system  # the caption stage and an encode of its own (~35 s in CI); off in the tiny preset
def test_one_caption_per_image_resumed_by_part_and_read_by_encode(ray_cluster, tmp_path, tiny_blip2,
                                                                             few_digits, monkeypatch):
    out = tmp_path / "run"
    cfg, layout = _config(out, few_digits, tiny_blip2), RunLayout(str(out))
    ids = sorted(f"{c}/{n}" for c in os.listdir(few_digits) for n in os.listdir(os.path.join(few_digits, c)))
    made = _previous_run(cfg)
    assert sorted(made) == [i for i in ids if i != "digit_7/broken.png"]
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in made.values())
    assert len(set(made.values())) > 5  # the captions follow the images
    some = ids[::7][:4]
    assert [made[i] for i in some] == _direct_captions(tiny_blip2, [os.path.join(few_digits, i) for i in some])

    # Rows lost (a run killed between parts, a part cut short): the stage captions those images only, on Ray.
    parts = sorted(part_files(layout.captions_dir(PARTS)))
    lost: list[str] = []
    for url in parts[:2]:
        table = pq.read_table(storage.open_file(url))
        storage.remove(url)
        kept = table.slice(table.num_rows - 3) if url == parts[1] else table.slice(0, 0)
        lost += sorted(set(table.column("image_id").to_pylist()) - set(kept.column("image_id").to_pylist()))
        if kept.num_rows:
            write_part(layout.captions_dir(PARTS), kept)
    first = run_caption(cfg)
    assert (first["images"], first["captioned_now"], first["captions"], first["unreadable"]) == (31, len(lost), 30, 1)
    assert 11 <= len(lost) <= 13 and not first["skipped"]  # a part of 7 or 8 rows, and 4 or 5 rows of another
    assert first["unreadable_files"][0]["image_id"] == "digit_7/broken.png"
    rows = read_parts(layout.captions_dir(PARTS), ["image_id"])["image_id"].to_pylist()
    assert sorted(rows) == ids  # one row per image, none twice
    assert _jsonl(out) == made  # one line per readable image: the Ray actors caption as the stage's workers do

    # A rerun has nothing to caption: no Ray work, the parts and the file stay as they are.
    parts = sorted(part_files(layout.captions_dir(PARTS)))
    with monkeypatch.context() as mp:
        forbid_ray_work(mp)
        again = run_caption(cfg)
    assert again["skipped"] and again["captioned_now"] == len(lost) and sorted(part_files(layout.captions_dir(PARTS))) == parts
    assert _jsonl(out) == made

    # Encode plans its rows with the stage's captions (planning only: that a captions file's captions reach the
    # bank's caption column, which the prompts are built from, tests/test_encode.py follows on Ray).
    url, captions = encode.training_captions(cfg)
    planned, matched = encode.pending_rows(real_set(cfg.data.train, cfg), "train", cfg.out, captions, url)
    assert url == layout.captions_url() and matched == 30 / 31
    assert {r["image_id"]: r["caption"] for r in planned.to_pylist() if r["caption"]} == made
