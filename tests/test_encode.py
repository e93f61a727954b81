"""Encode stage: fast checks, then end to end on the tiny preset (one shared Ray cluster and encoded bank)."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import forbid_ray_work, record_plan
from PIL import Image

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, read_parts
from realfake_ray.bank import read_meta
from realfake_ray.config import load_config
from realfake_ray.data.captions import read_captions
from realfake_ray.data.imagefolder import DatasetError
from realfake_ray.data.sources import LabelledSet, open_labelled_set
from realfake_ray.stages.encode.driver import build_pipeline, decode_batch, pending_rows, run_encode
from realfake_ray.layout import RunLayout


def _bank_table(out, split):
    return read_parts(RunLayout(out).bank_dir(split))


@pytest.mark.e2e
def test_one_row_per_readable_image_with_shapes_and_dtypes(tiny_bank):
    meta = read_meta(tiny_bank)
    assert meta["splits"]["train"]["rows"] == 1437 and meta["splits"]["val"]["rows"] == 360
    assert meta["latent_shape"] == [4, 8, 8] and meta["resolution"] == 32
    assert meta["class_names"][0] == "digit zero"
    table = _bank_table(tiny_bank, "train")
    assert table.num_rows == 1437 and len(set(table["image_id"].to_pylist())) == 1437
    # Arrow's own tensor type: any Parquet reader gets each row's shape, with or without Ray
    schema = pq.read_schema(part_files(RunLayout(tiny_bank).bank_dir("train"))[0])
    for column, shape in (("latent_mean", [4, 8, 8]), ("latent_std", [4, 8, 8]), ("clip_embed", [64])):
        assert isinstance(schema.field(column).type, pa.FixedShapeTensorType) and schema.field(column).type.shape == shape
    import ray.data

    batch = ray.data.read_parquet(RunLayout(tiny_bank).bank_dir("train")).take_batch(8)
    assert batch["latent_mean"].shape == (8, 4, 8, 8) and batch["latent_mean"].dtype == np.float16
    assert batch["latent_std"].dtype == np.float16 and (batch["latent_std"] > 0).all()
    assert batch["clip_embed"].shape == (8, 64) and batch["clip_embed"].dtype == np.float16
    assert set(batch["caption"]) == {""}  # the tiny preset runs without captions
    assert batch["width"].tolist() == [32] * 8


@pytest.mark.e2e
def test_latents_match_a_direct_vae_encode(tiny_bank, tiny_model_dir):
    import torch

    from realfake_ray.data.imagefolder import decode_image
    from realfake_ray.models.loading import load_vae

    row = _bank_table(tiny_bank, "train").slice(0, 1).to_pylist()[0]
    pixels, _, _ = decode_image(storage.read_bytes(f"embedded:digits/train/{row['image_id']}"), 32)
    vae = load_vae(tiny_model_dir)
    with torch.no_grad():
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        mean = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    stored = np.asarray(row["latent_mean"], dtype=np.float32).reshape(mean.shape)
    np.testing.assert_allclose(stored, mean.numpy(), atol=2e-3, rtol=2e-3)


@pytest.mark.e2e
def test_rerun_over_a_complete_bank_does_no_work(tiny_bank, monkeypatch):
    before = sorted(part_files(RunLayout(tiny_bank).bank_dir("train")))
    recorded = read_meta(tiny_bank)
    forbid_ray_work(monkeypatch)
    meta = run_encode(load_config(preset="tiny", out=tiny_bank))
    assert meta.pop("skipped") is True and meta == recorded  # the record, with the encoding run's own rate
    assert meta["last_run"]["encoded_now"] == 1797 and meta["last_run"]["images_per_s"] > 0
    assert sorted(part_files(RunLayout(tiny_bank).bank_dir("train"))) == before and read_meta(tiny_bank) == recorded


@pytest.mark.e2e
def test_partial_bank_is_completed_and_corrupt_files_are_listed(ray_cluster, tmp_path):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(5):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 24), (i * 40, 100, 200)).save(buf, format="PNG")
            (data / cls / f"{i}.png").write_bytes(buf.getvalue())
    (data / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    captions = {f"{c}/{i}.png": f"a {c} square number {i}" for c in "ab" for i in range(5) if i != 3}
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n"
                                                     for k, v in captions.items()))
    out = str(tmp_path / "run")
    cfg = load_config(preset="tiny", out=out, data__train=str(data), overrides=[
        "encode.rows_per_file=4", f"data.captions_file={tmp_path / 'captions.jsonl'}"])
    first = run_encode(cfg)
    assert first["splits"]["train"]["rows"] == 10 and first["splits"]["train"]["skipped"] == 1
    assert first["splits"]["train"]["skipped_files"][0]["image_id"] == "b/broken.png"
    assert first["captions_from"] == str(tmp_path / "captions.jsonl") and first["caption_match"]["train"] == 8 / 11
    # Simulate a run killed after some parts were written: drop two parts, rerun, nothing lost or doubled.
    parts = sorted(part_files(RunLayout(out).bank_dir("train")))
    for url in parts[:2]:
        storage.remove(url)
    second = run_encode(cfg)
    assert 0 < second["last_run"]["encoded_now"] < 10
    bank = _bank_table(out, "train").select(["image_id", "caption"]).to_pylist()
    ids = sorted(f"{c}/{i}.png" for c in "ab" for i in range(5))
    assert sorted(r["image_id"] for r in bank) == ids and second["splits"]["train"]["skipped"] == 1
    # each image's caption from the captions file ("" for those it lacks), through the resumed run too
    assert {r["image_id"]: r["caption"] for r in bank} == {i: captions.get(i, "") for i in ids}


@pytest.mark.e2e
def test_each_image_stores_its_generation_view_and_its_whole_fine_tuning_view(ray_cluster, tmp_path):
    import numpy as np

    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    yy, xx = np.mgrid[0:30, 0:40]
    Image.fromarray(np.stack([xx * 6, yy * 8, xx + yy], -1).astype(np.uint8)).save(data / "wide.png")  # 4:3
    Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(data / "square.png")
    out = str(tmp_path / "run")
    meta = run_encode(load_config(preset="tiny", out=out, data__train=str(tmp_path / "data")))
    assert meta["format"] == 2 and meta["generation_view"] == "squash" and meta["latent_shape"] == [4, 8, 8]
    rows = {r["image_id"]: r for r in _bank_table(out, "train").to_pylist()}
    wide, square = rows["a/wide.png"], rows["a/square.png"]
    # 40×30 → short side 32 → 32×42.7 px, rounded down to whole latent cells (4 px): 8×10 latents.
    assert (wide["full_latent_h"], wide["full_latent_w"]) == (8, 10)
    assert len(wide["full_latent_mean"]) == 4 * 8 * 10 * 2 and np.asarray(wide["latent_mean"]).size == 4 * 8 * 8
    assert (square["full_latent_h"], square["full_latent_w"]) == (8, 8)
    assert square["full_latent_mean"] == np.asarray(square["latent_mean"], np.float16).tobytes()  # one view


@pytest.mark.e2e
def test_a_bank_encoded_again_from_the_same_inputs_is_the_same_files(tiny_bank, tmp_path):
    # Fine-tuning reads the bank's files in name order and generate cuts its shards from them, so a fresh run of the
    # same config reproduces its LoRA and synthetic set only if the files are too (the names were random before).
    out = str(tmp_path / "again")
    run_encode(load_config(preset="tiny", out=out))

    def files(run):
        root = Path(RunLayout(run).bank_dir())
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}

    first, again = files(tiny_bank), files(out)
    assert len(first) > 2 and first == again


@pytest.mark.e2e
def test_bank_from_another_model_is_refused(ray_cluster, tiny_bank, tmp_path):
    out = str(tmp_path / "run")  # a copy: the session's bank stays as it is
    shutil.copytree(RunLayout(tiny_bank).bank_dir(), RunLayout(out).bank_dir())
    meta_path = RunLayout(out).meta_url()
    meta = storage.read_json(meta_path)
    meta["model"]["vae_sha256"] = "0" * 64
    storage.write_json(meta_path, meta)
    with pytest.raises(ValueError, match="another VAE"):
        run_encode(load_config(preset="tiny", out=out))


def test_cut_off_first_run_with_another_model_is_refused(tmp_path, no_ray):
    """No _meta.json yet (the first run died mid-way), but its identity record names another VAE."""
    storage.write_json(storage.join(RunLayout(str(tmp_path)).bank_dir(), "_identity.json"),
                       {"model": {"vae_sha256": "0" * 64, "pretrained": "other/model"}, "resolution": 32})
    with pytest.raises(ValueError, match="another VAE, resolution, view or bank format.*other/model"):
        run_encode(load_config(preset="tiny", out=str(tmp_path)))


def test_a_bank_of_another_train_subset_is_refused(tmp_path, no_ray):
    """A bank begun from the whole train set (or another data.train_per_class / seed) is not silently reused by a
    data-scarce run: every stage after encode would otherwise fine-tune and generate from the wrong images."""
    out = str(tmp_path)
    storage.write_json(storage.join(RunLayout(out).bank_dir(), "_identity.json"),
                       {"model": {"vae_sha256": "0" * 64, "pretrained": "other/model"}, "resolution": 32})
    with pytest.raises(ValueError, match=r"train_subset None .*asks for \{'per_class': 10, 'seed': 42\}"):
        run_encode(load_config(preset="tiny", out=out, overrides=["data.train_per_class=10"]))


def test_decode_batch_marks_errors_without_raising():
    batch = {"url": np.array(["memory://nope.png"], dtype=object), "image_id": np.array(["x"], dtype=object)}
    out = decode_batch(batch, 8)
    assert out["error"][0] and out["pixels"].shape == (1, 8, 8, 3)


def test_folder_names_as_class_names_are_warned_about_naming_the_fix(tmp_path, capsys):
    from realfake_ray.stages.encode.driver import scan_splits

    for folder in ("n01440764", "n02102040"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / folder / "a.png")
    scan_splits(load_config(data__train=str(tmp_path / "data"), overrides=["caption.enabled=false"]))
    out = capsys.readouterr().out
    assert 'photo of n01440764' in out and "--set data.classes_file=" in out
    scan_splits(load_config(preset="tiny"))  # the embedded digits come with a classes file: no warning
    assert "warning" not in capsys.readouterr().out


def _imagenet_shaped(root, per_class: int = 4) -> dict:
    """The digits 0-2 in the layouts ImageNet comes in: train as Hugging Face Parquet shards (ClassLabel names =
    synset-like ids, readable names from a classes file), val as the official flat folder + LOC_val_solution.csv,
    and two OOD sets: class-index folders (ImageNet-V2) and WebDataset tars."""
    import tarfile

    import datasets

    synsets = ["n00000000", "n00000001", "n00000002"]
    folders = [storage.resolve_embedded(f"embedded:digits/train/digit_{i}") for i in range(3)]
    digits = {s: sorted(os.path.join(f, name) for name in os.listdir(f)) for s, f in zip(synsets, folders)}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=synsets)})
    rows = {"image": [], "label": []}
    for label, s in enumerate(synsets):
        for path in digits[s][:per_class]:
            rows["image"].append({"bytes": open(path, "rb").read(), "path": None})
            rows["label"].append(label)
    (root / "hf" / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.shard(2, 0).to_parquet(str(root / "hf" / "data" / "train-00000-of-00002.parquet"))
    ds.shard(2, 1).to_parquet(str(root / "hf" / "data" / "train-00001-of-00002.parquet"))
    (root / "val").mkdir()
    lines, n = ["ImageId,PredictionString"], 0
    for s in synsets:
        for path in digits[s][per_class : per_class + 2]:
            n += 1
            shutil.copy(path, root / "val" / f"ILSVRC2012_val_{n:08d}.png")
            lines.append(f"ILSVRC2012_val_{n:08d},{s} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("".join(f"{s} digit {d}, a numeral\n" for s, d in zip(synsets, ("zero", "one", "two"))))
    for index, s in enumerate(synsets):
        (root / "v2" / str(index)).mkdir(parents=True)
        shutil.copy(digits[s][-1], root / "v2" / str(index) / "a.png")
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "shard-0.tar", "w") as tar:
        for index, s in enumerate(synsets):
            for suffix, data in ((".png", open(digits[s][-2], "rb").read()), (".cls", str(index).encode())):
                info = tarfile.TarInfo(f"{s}{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {"train": str(root / "hf" / "data" / "train-*.parquet"), "val": str(root / "val"),
            "labels": str(root / "LOC_val_solution.csv"), "classes": str(root / "classes.txt"),
            "v2": str(root / "v2"), "wds": str(root / "wds")}


@pytest.mark.e2e
@pytest.mark.system
def test_imagenet_shaped_inputs_encode_and_train(ray_cluster, tmp_path):
    """Hugging Face Parquet train shards, the official flat val + LOC_val_solution.csv, and ImageNet-V2-style
    index folders and WebDataset tars as OOD sets: encoded into one bank, then a real-only classifier trained
    on the shards and evaluated on every set (one epoch: the plumbing, not the accuracy)."""
    from realfake_ray.stages.pipeline import run_pipeline

    paths = _imagenet_shaped(tmp_path)
    cfg = load_config(preset="tiny", out=str(tmp_path / "run"), data__train=paths["train"], data__val=paths["val"],
                      overrides=[f"data.val_labels={paths['labels']}", f"data.classes_file={paths['classes']}",
                                 f"evaluate.extra_sets={{v2: {paths['v2']}, wds: {paths['wds']}}}",
                                 "train.source=real", "train.real_baseline=false", "train.epochs=1",
                                 "train.batch_size=4", "evaluate.distribution_metrics=false"])
    summary = run_pipeline(cfg, only=["encode", "train"])
    meta = read_meta(cfg.out)
    assert meta["layouts"] == {"train": "parquet", "val": "labels_file"}
    assert meta["class_dirs"] == ["n00000000", "n00000001", "n00000002"]
    assert meta["class_names"] == ["digit zero", "digit one", "digit two"]  # from the classes file
    assert meta["splits"]["train"]["rows"] == 12 and meta["splits"]["val"]["rows"] == 6
    bank = _bank_table(cfg.out, "train").to_pylist()
    assert sorted(r["image_id"] for r in bank)[0] == "train-00000-of-00002.parquet#0"
    assert sorted({(r["label"], r["class_dir"]) for r in bank}) == [(0, "n00000000"), (1, "n00000001"), (2, "n00000002")]
    sets = summary["train"]["result"]["evaluation"]["sets"]
    assert {k: v["count"] for k, v in sets.items()} == {"val": 6, "v2": 3, "wds": 3}
    assert summary["train"]["result"]["real_images"] == 12


def _one_pending_image() -> dict:
    """What encode's planning hands build_pipeline: per split, the set and its pending rows (here one image)."""
    rows = pa.table({"image_id": ["a/x.png"], "url": ["/d/a/x.png"], "label": [0], "caption": [""], "split": ["train"]})
    return {"train": (LabelledSet("/d", "imagefolder", ["a"], ["a"], items=rows.select(["image_id", "url", "label"])), rows)}


@pytest.mark.parametrize("captions", [[], ["caption.enabled=false"], ["data.captions_file=captions.jsonl"]])
def test_the_encoder_pool_takes_all_of_encode_actors_whatever_the_captioning(monkeypatch, no_ray, captions):
    """BLIP-2 captioning is the caption stage's (its own pool, run before encode): encode plans one GPU pool, the
    encoder's, with all of encode.actors, and runs with max_size 1 (before: two pools split it, 1 was refused)."""
    for max_size in (64, 1):
        recorder = record_plan(monkeypatch)
        build_pipeline(_one_pending_image(), load_config(preset="tiny", out="memory://plan", overrides=[
            "encode.actors.min_size=1", f"encode.actors.max_size={max_size}", "encode.actors.gpus_per_actor=1",
            *captions]))
        pools = recorder.pools()
        assert set(pools) == {"LatentEncoder"}
        assert (pools["LatentEncoder"].min_size, pools["LatentEncoder"].initial_size,
                pools["LatentEncoder"].max_size) == (1, max_size, max_size)


def _two_classes(root) -> str:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
    return str(root)


def test_the_training_captions_fill_the_caption_column_and_one_for_another_set_is_refused(tmp_path, no_ray):
    lset = open_labelled_set(_two_classes(tmp_path / "data"))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": f"cap {i}"}) + "\n" for i in ("a/0.png", "b/1.png")))
    rows, matched = pending_rows(lset, "train", str(tmp_path / "run"), read_captions(str(captions)), str(captions))
    assert dict(zip(rows["image_id"].to_pylist(), rows["caption"].to_pylist())) == {
        "a/0.png": "cap a/0.png", "a/1.png": "", "b/0.png": "", "b/1.png": "cap b/1.png"}
    assert matched == 0.5 and set(rows["split"].to_pylist()) == {"train"}
    # Keys without the class folder (a common mistake) match no image: refused, not silently empty captions.
    captions.write_text("".join(json.dumps({"image_id": f"{i}.png", "caption": "x"}) + "\n" for i in range(2)))
    with pytest.raises(DatasetError, match=r"only 0 of 4 images .* have a caption \(0% < 50%\).*'a/0.png'"):
        pending_rows(lset, "train", str(tmp_path / "run"), read_captions(str(captions)), str(captions))
    rows, matched = pending_rows(lset, "val", str(tmp_path / "run"), None)
    assert matched is None and set(rows["caption"].to_pylist()) == {""}
