"""FLOP accounting: SD v1.5 constants, counting, peaks and MFU."""

from __future__ import annotations

import pytest
import torch

from realfake_ray.tools.flops import SD15_FLOPS, count_forward_flops, denoising_steps, img2img_flops, mfu, peak_flops


def test_reference_img2img_flops():
    per_image = img2img_flops(30, 0.75, cfg=True)
    assert denoising_steps(30, 0.75) == 22
    assert per_image == pytest.approx(22 * 1.61e12 + 2.5e12, rel=1e-3)
    assert SD15_FLOPS.cfg_step == pytest.approx(1.61e12)


def test_img2img_flops_options():
    assert img2img_flops(30, 0.75, cfg=False, decode=False) == pytest.approx(22 * SD15_FLOPS.unet_fwd)
    with_encode = img2img_flops(30, 0.75, cfg=True, encode=True)
    assert with_encode - img2img_flops(30, 0.75, cfg=True) == pytest.approx(1.1e12)
    assert img2img_flops(10, 1.0, cfg=True, unet_fwd_flops=1.0, vae_decode_flops=5.0) == 25.0


@pytest.mark.parametrize(("batch", "n_in", "n_out"), [(1, 8, 4), (3, 16, 5)])
def test_count_linear_flops(batch, n_in, n_out):
    layer = torch.nn.Linear(n_in, n_out)
    assert count_forward_flops(layer, torch.zeros(batch, n_in)) == 2 * n_in * n_out * batch


def test_peak_flops_table():
    assert peak_flops("cuda", "bf16", name="NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cuda", "fp16", name="NVIDIA H200") == 989e12
    assert peak_flops("cuda", "fp16", name="NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cuda", "fp32", name="NVIDIA A100-SXM4-80GB") == 156e12
    assert peak_flops("cuda", "bf16", name="NVIDIA H100 PCIe") == 756e12
    assert peak_flops("cuda", "bf16", name="Some Future GPU") is None
    assert peak_flops("cpu") is None
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("cpu", "int8")


def test_mfu_arithmetic():
    assert mfu(10.0, 38e12, 989e12) == pytest.approx(380 / 989)
    assert mfu(2.0, 1e12, 4e12) == 0.5
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, 1.0, 0.0)


def test_sd15_architecture_matches_constants():
    """Count FLOPs of the SD v1.5 UNet/VAE (benchmark architecture) on the meta device: no memory, no compute."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sampler.py"
    spec = importlib.util.spec_from_file_location("bench_sampler", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with torch.device("meta"):
        unet, vae = bench.build_sd15_unet(), bench.build_sd15_vae()
        latent, text, pixels = torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 768), torch.zeros(1, 3, 512, 512)
        unet_fwd = count_forward_flops(unet, latent, torch.tensor(500), encoder_hidden_states=text)
        decode, encode = count_forward_flops(vae.decode, latent), count_forward_flops(vae.encode, pixels)
    assert unet_fwd == pytest.approx(SD15_FLOPS.unet_fwd, rel=0.02)
    assert decode == pytest.approx(SD15_FLOPS.vae_decode, rel=0.02)
    assert encode == pytest.approx(SD15_FLOPS.vae_encode, rel=0.02)
