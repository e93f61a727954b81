"""The tiny preset and the model loader (no Ray)."""

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
