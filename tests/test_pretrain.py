"""Pretraining the tiny base: a few steps of every phase write a pipeline stock diffusers loads."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from realfake_ray.cli import main as cli_main
from realfake_ray.models.pretrain import PretrainConfig, pretrain_base, render_corpus, vae_psnr
from realfake_ray.models.tiny import build_random_tiny_pipeline


def test_render_corpus_in_processes_equals_in_one():
    one = render_corpus(5, 10, 30, processes=1)
    two = render_corpus(5, 10, 30, processes=2)
    assert np.array_equal(one[0], two[0]) and one[1].tolist() == two[1].tolist() and one[2] == two[2]


@pytest.mark.e2e
def test_a_short_pretraining_writes_a_stock_diffusers_pipeline_with_its_record(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = PretrainConfig(corpus_size=64, holdout_size=32, vae_steps=2, vae_batch=8, clip_steps=2, clip_batch=8,
                         unet_steps=2, unet_batch=8)
    record = pretrain_base(str(tmp_path / "base"), cfg, log=lambda _: None)
    assert set(record["phases"]) == {"corpus", "vae", "clip", "unet"}
    assert record["phases"]["vae"]["scaling_factor"] > 0 and "holdout_zero_shot" in record["phases"]["clip"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "base"))
    assert pipe.image_encoder is not None
    weights = load_file(str(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}  # stored in fp16 (half the bytes to ship)
    assert pipe.vae.config.scaling_factor == record["phases"]["vae"]["scaling_factor"]
    saved = json.loads((tmp_path / "base" / "training.json").read_text())
    assert saved["config"]["unet_steps"] == 2 and saved["machine"]["cpus"] >= 1
    assert "realfake-ray tiny base" in (tmp_path / "base" / "README.md").read_text()
    # A UNet of another layout on the same encoders (how the SD-shaped base is retrained): the VAE and CLIP
    # towers are taken byte for byte, only the UNet trains; encoders of another corpus are refused.
    sd = dataclasses.replace(cfg, unet_layout="sd", encoders_from=str(tmp_path / "base"))
    record = pretrain_base(str(tmp_path / "sd"), sd, log=lambda _: None)
    assert record["phases"]["vae"]["reused_from"] == str(tmp_path / "base") and "history" not in record["phases"]["clip"]
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "image_encoder/model.safetensors"):
        assert (tmp_path / "sd" / part).read_bytes() == (tmp_path / "base" / part).read_bytes(), part
    unet = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd")).unet
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D" and unet.config.down_block_types[-1] == "DownBlock2D"
    assert "cross-attention at 8×8, 4×4" in (tmp_path / "sd" / "README.md").read_text()
    with pytest.raises(ValueError, match="pretrained on corpus"):
        pretrain_base(str(tmp_path / "other"), dataclasses.replace(sd, seed=1), log=lambda _: None)


def test_pretrain_base_cli_passes_its_step_flags(tmp_path, monkeypatch):
    seen = {}

    def fake(out, cfg):
        seen.update(out=out, cfg=cfg)
        return {"wall_seconds": 1.0}

    monkeypatch.setattr("realfake_ray.models.pretrain.pretrain_base", fake)
    assert cli_main(["pretrain-base", "--out", str(tmp_path), "--seed", "3", "--unet-steps", "7"]) == 0
    assert seen["cfg"].seed == 3 and seen["cfg"].unet_steps == 7 and seen["cfg"].vae_steps == PretrainConfig().vae_steps
    assert seen["cfg"].unet_layout == "sd" and seen["cfg"].encoders_from is None
    assert cli_main(["pretrain-base", "--out", str(tmp_path), "--unet-layout", "v1", "--encoders-from", "/b"]) == 0
    assert (seen["cfg"].unet_layout, seen["cfg"].encoders_from) == ("v1", "/b")


def test_vae_psnr_of_an_untrained_vae_is_low():
    vae = build_random_tiny_pipeline().vae
    images = render_corpus(0, 0, 8, processes=1)[0]
    assert 0 < vae_psnr(vae, images) < 20  # random weights reconstruct nothing
