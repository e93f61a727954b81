"""The tiny preset and the model loader (no Ray)."""

import json
import os
import time

import numpy as np
import pytest
import torch

from realfake_ray.models import loading
from realfake_ray.models.tiny import build_tiny_tokenizer


def test_tiny_preset_loads_with_stock_diffusers_and_our_loader_identically(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    ours = loading.load_pipeline(tiny_model_dir)
    assert stock.image_encoder is not None and stock.feature_extractor is not None
    outputs = []
    for pipe in (stock, ours):
        out = pipe("photo of digit zero", num_inference_steps=3, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        outputs.append(out.images)
    assert outputs[0].shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_preset_is_the_shipped_base_in_fp32_and_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from realfake_ray.cli import main as cli_main

    assert cli_main(["preset", "tiny", "--out", str(tmp_path / "again")]) == 0
    for component in ("unet", "vae", "text_encoder", "image_encoder"):
        assert loading.weights_sha256(str(tmp_path / "again" / component)) == loading.weights_sha256(
            os.path.join(tiny_model_dir, component)
        )
    shipped = load_file(os.path.join(loading.TINY_BASE_DIR, "unet", "diffusion_pytorch_model.safetensors"))
    cached = load_file(os.path.join(tiny_model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(cached[k].dtype == torch.float32 and torch.equal(cached[k], v.float()) for k, v in shipped.items())
    assert os.path.basename(tiny_model_dir) == f"preset-tiny-{loading.shipped_base_digest()}"


def test_a_checkout_without_the_shipped_weights_says_how_to_rebuild_them(tmp_path):
    with pytest.raises(loading.ModelLoadError, match="realfake pretrain-base --out DIR"):
        loading.shipped_base_digest(str(tmp_path))


def test_the_random_weight_architecture_is_deterministic():
    from realfake_ray.models.tiny import build_random_tiny_pipeline

    a, b = build_random_tiny_pipeline(), build_random_tiny_pipeline()
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_tokenizer_is_built_offline_with_learned_merges():
    tok = build_tiny_tokenizer()
    assert tok.tokenize("photo of digit zero") == ["photo</w>", "of</w>", "digit</w>", "zero</w>"]
    ids = tok("zebra", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id


def test_clip_components_and_width_check(tiny_model_dir):
    clip_dir = loading.clip_vision_dir(tiny_model_dir, "openai/clip-vit-large-patch14")
    assert clip_dir.endswith("image_encoder")  # the pipeline's own component wins
    model, processor = loading.load_clip_vision(clip_dir)
    assert model.config.projection_dim == 64 and processor.crop_size["height"] == 32
    info = loading.check_models(tiny_model_dir, clip_dir)
    assert info["latent_channels"] == 4 and info["vae_downsample"] == 4


def test_width_mismatch_is_a_clear_error(tmp_path, tiny_model_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg_path = bad / "image_encoder" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"projection_dim": 64', '"projection_dim": 32'))
    with pytest.raises(ValueError, match="64.*32|32.*64"):
        loading.check_models(str(bad), str(bad / "image_encoder"))


def test_fsspec_url_is_copied_once_into_the_cache(tmp_path, tiny_model_dir):
    from realfake_ray import storage

    url = "memory://models/tiny-copy"
    for path in storage.find(tiny_model_dir):
        storage.write_bytes(storage.join(url, storage.relative(path, tiny_model_dir)), storage.read_bytes(path))
    local = loading.resolve_model_dir(url)
    assert local.startswith(storage.cache_dir()) and os.path.isdir(os.path.join(local, "unet"))
    assert loading.resolve_model_dir(url) == local
    assert loading.weights_sha256(os.path.join(local, "vae")) == loading.weights_sha256(
        os.path.join(tiny_model_dir, "vae")
    )


def test_offline_hub_id_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    start = time.time()
    with pytest.raises(loading.ModelLoadError) as err:
        loading.resolve_model_dir("some-org/not-cached-model", timeout_s=2)
    assert time.time() - start < 15
    assert "some-org/not-cached-model" in str(err.value) and "local" in str(err.value)


def test_hf_offline_env_is_respected(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(loading.ModelLoadError, match="HF_HUB_OFFLINE"):
        loading.resolve_model_dir("openai/clip-vit-large-patch14")


def test_bad_specs():
    with pytest.raises(loading.ModelLoadError, match="not a Hugging Face repo id"):
        loading.resolve_model_dir("./no/such/dir/anywhere")
    with pytest.raises(loading.ModelLoadError, match="unknown model preset"):
        loading.resolve_model_dir("preset:huge")
    with pytest.raises(loading.ModelLoadError, match="not found"):
        loading.resolve_model_dir("memory://missing-model")


# The files of huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 (main), with the sizes of its weights.
# Sources (no hub access from here): a `scan_cache_dir` record of that repo's snapshot 451f4fe1 (30 files, with
# sizes) and an `HfApi` listing of its weight files with sizes, both quoted in public repositories' sources, and
# InvokeAI's test fixture `sd15_test_files` (every file of the component folders); their union, 36 files.
SD15_WEIGHT_SIZES = {
    "safety_checker/model.fp16.safetensors": 608018440, "safety_checker/model.safetensors": 1215981830,
    "safety_checker/pytorch_model.bin": 1216061799, "safety_checker/pytorch_model.fp16.bin": 608103564,
    "text_encoder/model.fp16.safetensors": 246144864, "text_encoder/model.safetensors": 492265874,
    "text_encoder/pytorch_model.bin": 492305335, "text_encoder/pytorch_model.fp16.bin": 246187076,
    "unet/diffusion_pytorch_model.bin": 3438354725, "unet/diffusion_pytorch_model.fp16.bin": 1719327893,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1719125304, "unet/diffusion_pytorch_model.non_ema.bin": 3438366373,
    "unet/diffusion_pytorch_model.non_ema.safetensors": 3438167536, "unet/diffusion_pytorch_model.safetensors": 3438167540,
    "v1-5-pruned-emaonly.ckpt": 4265380512, "v1-5-pruned-emaonly.safetensors": 4265146304,
    "v1-5-pruned.ckpt": 7703807346, "v1-5-pruned.safetensors": 7703324286,
    "vae/diffusion_pytorch_model.bin": 334707217, "vae/diffusion_pytorch_model.fp16.bin": 167405651,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167335342, "vae/diffusion_pytorch_model.safetensors": 334643276,
}
SD15_FILES = sorted([
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "vae/config.json",
    *SD15_WEIGHT_SIZES,
])
SD15_MODEL_INDEX = {  # its model_index.json
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_NEEDED = [
    "feature_extractor/preprocessor_config.json", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
# huggingface.co/openai/clip-vit-large-patch14 (main): its model card's file list, as mirrored in public
# repositories' download scripts (config, tokenizer and processor files with their sha256s, model.safetensors)
# plus the framework duplicates the repo carries (pytorch_model.bin, tf_model.h5, flax_model.msgpack).
CLIP_L14_FILES = [
    ".gitattributes", "README.md", "config.json", "flax_model.msgpack", "merges.txt", "model.safetensors",
    "preprocessor_config.json", "pytorch_model.bin", "special_tokens_map.json", "tf_model.h5", "tokenizer.json",
    "tokenizer_config.json", "vocab.json",
]


def test_sd15_downloads_only_the_components_the_pipeline_loads_in_one_weight_format():
    """Matched as huggingface_hub matches snapshot_download's patterns: the 13 files load_pipeline reads (4.27 GB
    of weights), not the root single-file checkpoints (~24 GB, of which the two .safetensors — ~12 GB — matched
    the old allow-list), the safety checker (load_pipeline passes None), .bin duplicates or fp16/non-EMA variants."""
    selected = loading.select_files(SD15_FILES, "pipeline", SD15_MODEL_INDEX)
    assert selected == SD15_NEEDED
    assert sum(SD15_WEIGHT_SIZES.get(f, 0) for f in selected) == 3438167540 + 492265874 + 334643276
    assert not {"v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
                "v1-5-pruned-emaonly.ckpt"} & set(selected)


def test_the_clip_vision_model_downloads_its_config_weights_and_image_processor_only():
    assert loading.select_files(CLIP_L14_FILES, "clip_vision") == [
        "config.json", "model.safetensors", "preprocessor_config.json"]


def test_a_pipelines_own_image_encoder_and_sharded_weights_are_kept():
    """The shipped tiny base (image_encoder + feature_extractor, no safety checker): every file but the model
    card and training record; sharded non-variant weights come with their index, variants of them do not."""
    files = sorted(os.path.relpath(os.path.join(d, f), loading.TINY_BASE_DIR).replace(os.sep, "/")
                   for d, _, names in os.walk(loading.TINY_BASE_DIR) for f in names)
    with open(os.path.join(loading.TINY_BASE_DIR, "model_index.json")) as f:
        index = json.load(f)
    assert loading.select_files(files, "pipeline", index) == [f for f in files if f not in ("README.md", "training.json")]
    sharded = ["unet/config.json", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
               "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
               "unet/diffusion_pytorch_model.safetensors.index.json",
               "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    assert loading.select_files(sharded, "pipeline", {"unet": ["diffusers", "UNet2DConditionModel"]}) == sharded[:4]


def _fake_hub(monkeypatch, tmp_path, files: list[str], model_index: dict | None, cached: bool = True) -> list[dict]:
    """huggingface_hub's download calls answered from a file list (no network): ``snapshot_download`` keeps
    what its patterns select, as the real one does; returns the list of its calls. ``cached=False``: nothing
    is in the local cache (the hub is taken as reachable)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def hf_hub_download(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        if local_files_only and not cached:
            raise LocalEntryNotFoundError(f"{filename} of {repo_id} is not cached")
        if model_index is None:
            raise EntryNotFoundError(f"{filename} not in {repo_id}")  # the hub raises its subclass
        (tmp_path / filename).write_text(json.dumps(model_index))
        return str(tmp_path / filename)

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        calls.append({**kwargs, "files": list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                                  ignore_patterns=ignore_patterns))})
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return calls


def test_hub_resolution_asks_huggingface_hub_for_the_loaded_files_only(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path, SD15_FILES, SD15_MODEL_INDEX)
    assert loading.resolve_model_dir("stable-diffusion-v1-5/stable-diffusion-v1-5") == str(tmp_path)
    assert calls == [{"revision": None, "local_files_only": True, "files": SD15_NEEDED}]  # served from the cache
    calls = _fake_hub(monkeypatch, tmp_path, CLIP_L14_FILES, None)
    assert loading.clip_vision_dir(str(tmp_path / "no-image-encoder"), "openai/clip-vit-large-patch14") == str(tmp_path)
    assert calls[0]["files"] == ["config.json", "model.safetensors", "preprocessor_config.json"]


def test_a_hub_download_fetches_the_loaded_files_only_and_a_non_pipeline_is_named(monkeypatch, tmp_path):
    calls = _fake_hub(monkeypatch, tmp_path, SD15_FILES, SD15_MODEL_INDEX, cached=False)
    loading.resolve_model_dir("stable-diffusion-v1-5/stable-diffusion-v1-5", timeout_s=3)
    assert calls == [{"revision": None, "etag_timeout": 3, "files": SD15_NEEDED}]
    _fake_hub(monkeypatch, tmp_path, CLIP_L14_FILES, None, cached=False)
    with pytest.raises(loading.ModelLoadError, match=r"'openai/clip-vit-large-patch14': no model_index.json: not a "
                                                     r"diffusers pipeline"):
        loading.resolve_model_dir("openai/clip-vit-large-patch14")


def test_actors_of_one_node_download_a_hub_model_once(monkeypatch, tmp_path):
    """Four threads resolve one hub id that is not cached yet; the download waits until all four have entered
    hub_snapshot. One downloads, the other three then find it in the cache."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from realfake_ray import storage

    _fake_hub(monkeypatch, tmp_path, SD15_FILES, SD15_MODEL_INDEX)
    fake_snapshot, downloads, resolving = huggingface_hub.snapshot_download, [], 4
    entered, original_cache_dir = threading.Semaphore(0), storage.cache_dir

    def cache_dir(*parts):  # hub_snapshot's first step: the lock's path
        entered.release()
        return original_cache_dir(*parts)

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only and not downloads:
            raise LocalEntryNotFoundError("not cached yet")
        if not local_files_only:
            for _ in range(resolving):
                assert entered.acquire(timeout=60)
            downloads.append(repo_id)
        return fake_snapshot(repo_id, local_files_only=local_files_only, **kwargs)

    monkeypatch.setattr(storage, "cache_dir", cache_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with ThreadPoolExecutor(resolving) as pool:
        dirs = list(pool.map(lambda _: loading.hub_snapshot("stable-diffusion-v1-5/stable-diffusion-v1-5"),
                             range(resolving)))
    assert dirs == [str(tmp_path)] * resolving and downloads == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]


def _put_tree(local_dir: str, url: str) -> None:
    from realfake_ray import storage

    for path in storage.find(local_dir):
        storage.write_bytes(storage.join(url, storage.relative(path, local_dir)), storage.read_bytes(path))


def test_actors_of_one_node_resolving_one_url_at_once_copy_it_once(counting_fs, tiny_model_dir, monkeypatch):
    """Four threads (as the actors of a node) resolve the same URL; the copy's first read waits until all four
    are past resolve_model_dir's first step, before any of them could see a complete copy. One copy happens
    (every byte of the source read once), all get the same complete directory, byte-identical to the source."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from realfake_ray import storage

    url = "countmem://models/tiny"
    _put_tree(tiny_model_dir, url)
    started, resolving = threading.Semaphore(0), 4
    original_isdir = storage.isdir

    def isdir(spec):  # resolve_model_dir's first step, before it looks at the cache
        started.release()
        return original_isdir(spec)

    def first_read_waits_for_everyone(path, start, end):
        counting_fs.before_read = None
        for _ in range(resolving):
            assert started.acquire(timeout=60)

    monkeypatch.setattr(storage, "isdir", isdir)
    counting_fs.before_read = first_read_waits_for_everyone
    with ThreadPoolExecutor(resolving) as pool:
        dirs = list(pool.map(lambda _: loading.resolve_model_dir(url), range(resolving)))
    assert len(set(dirs)) == 1 and os.path.isfile(os.path.join(dirs[0], ".realfake-complete"))
    copied = {p for p, _, _ in counting_fs.reads if p.endswith(".safetensors")}
    assert copied and all(sum(e - s for p, s, e in counting_fs.reads if p == path) == len(counting_fs.store[path].getvalue())
                          for path in copied)
    for component in ("unet", "vae", "text_encoder", "image_encoder"):
        assert loading.weights_sha256(os.path.join(dirs[0], component)) == loading.weights_sha256(
            os.path.join(tiny_model_dir, component))
    assert not os.path.exists(os.path.join(dirs[0], "training.json"))  # not read by any loader: not copied
    assert [p for p in os.listdir(os.path.dirname(dirs[0])) if ".tmp-" in p] == []


def test_an_interrupted_copy_is_never_taken_for_a_complete_one(counting_fs, tiny_model_dir):
    url = "countmem://models/tiny-interrupted"
    _put_tree(tiny_model_dir, url)

    def fail(path, start, end):
        if path.endswith("unet/diffusion_pytorch_model.safetensors"):
            raise ConnectionError("connection reset while copying")

    counting_fs.before_read = fail
    with pytest.raises(ConnectionError):
        loading.resolve_model_dir(url)
    counting_fs.before_read = None
    target = loading.resolve_model_dir(url)
    assert loading.weights_sha256(os.path.join(target, "unet")) == loading.weights_sha256(
        os.path.join(tiny_model_dir, "unet"))
    os.remove(os.path.join(target, ".realfake-complete"))  # as if a copy had stopped before its marker
    os.remove(os.path.join(target, "vae", "diffusion_pytorch_model.safetensors"))
    assert loading.resolve_model_dir(url) == target and os.path.isfile(
        os.path.join(target, "vae", "diffusion_pytorch_model.safetensors"))


def test_a_url_that_is_not_a_pipeline_is_named(counting_fs):
    from realfake_ray import storage

    storage.write_bytes("countmem://models/not-a-pipeline/unet/config.json", b"{}")
    with pytest.raises(loading.ModelLoadError, match=r"countmem://models/not-a-pipeline: no model_index.json"):
        loading.resolve_model_dir("countmem://models/not-a-pipeline")
