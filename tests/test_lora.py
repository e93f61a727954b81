"""LoRA helpers on the tiny UNet (no Ray): trainable set, diffusers-format save, stock-pipeline load."""

import os

import numpy as np
import pytest
import torch

from realfake_ray.method.lora import LORA_WEIGHT_NAME, add_lora, load_lora, lora_parameters, lora_sha256, save_lora
from realfake_ray.models.loading import load_pipeline


@pytest.fixture
def pipe(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


def _trained_lora(unet, seed=0):
    """Attach a rank-2, alpha-4 adapter and give lora_B non-zero values (a no-op adapter proves nothing)."""
    torch.manual_seed(seed)
    params = add_lora(unet, rank=2, alpha=4.0)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    return params


def _unet_out(unet):
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), text, return_dict=False)[0]


def _images(pipe):
    out = pipe("photo of digit one", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images


def test_only_lora_parameters_are_trainable(pipe):
    unet = pipe.unet
    base = sum(p.numel() for p in unet.parameters())
    params = add_lora(unet, rank=4)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(params) == len(trainable) == len(lora_parameters(unet))
    assert all(p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in unet.parameters()) - base == sum(p.numel() for p in params)
    # lora_B starts at zero: the fresh adapter does not change the UNet.
    assert all(float(p.detach().abs().sum()) == 0 for n, p in unet.named_parameters() if "lora_B" in n)


def test_unknown_target_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="to_qq"):
        add_lora(pipe.unet, rank=4, targets=["to_qq"])


def test_saved_lora_loads_in_a_stock_pipeline_and_changes_its_output(pipe, tiny_model_dir, tmp_path):
    baseline = _images(pipe)
    _trained_lora(pipe.unet)
    expected = _unet_out(pipe.unet)
    path = save_lora(pipe.unet, str(tmp_path / "lora"))
    assert path == str(tmp_path / "lora" / LORA_WEIGHT_NAME)
    assert [f for f in os.listdir(tmp_path / "lora")] == [LORA_WEIGHT_NAME]  # the temp dir is gone

    stock = load_pipeline(tiny_model_dir)
    stock.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(_unet_out(stock.unet), expected)  # rank, alpha and targets survive the trip
    assert np.abs(_images(stock) - baseline).max() > 1e-4


def test_load_lora_restores_weights_and_sha_is_stable(pipe, tiny_model_dir, tmp_path):
    _trained_lora(pipe.unet, seed=1)
    save_lora(pipe.unet, str(tmp_path))
    other = load_pipeline(tiny_model_dir).unet
    _trained_lora(other, seed=2)
    load_lora(other, str(tmp_path))
    ours = dict(pipe.unet.named_parameters())
    assert all(torch.equal(ours[n], p) for n, p in other.named_parameters() if "lora_" in n)
    digest = lora_sha256(str(tmp_path))
    assert len(digest) == 64
    save_lora(other, str(tmp_path / "same"))  # the same weights from another unet: the same digest
    assert lora_sha256(str(tmp_path / "same")) == digest
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if "lora_B" in n).add_(1e-3)
    save_lora(other, str(tmp_path / "changed"))
    assert lora_sha256(str(tmp_path / "changed")) != digest
    wrong_rank = load_pipeline(tiny_model_dir).unet
    add_lora(wrong_rank, rank=3)
    with pytest.raises((ValueError, RuntimeError)):
        load_lora(wrong_rank, str(tmp_path))
