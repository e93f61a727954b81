"""LoRA helpers on the tiny UNet (no Ray): trainable set, diffusers-format save, stock-pipeline load."""

import os

import numpy as np
import pytest
import torch

from realfake_ray.method.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    apply_lora,
    load_lora,
    lora_parameters,
    lora_sha256,
    lora_state_dict,
    save_lora,
)
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


WIDE = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def test_an_adapter_on_convolutions_and_feed_forward_too_loads_whole(pipe, tiny_model_dir, tmp_path):
    """diffusers converts only the attention projections to its own key format and its loader reads a file of
    mixed formats only in part: an adapter on attention + convolutions came back without its attention factors
    (silently). Such an adapter is saved in one format (PEFT's) and loads whole; a file the loader takes only in
    part is refused by name."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    with torch.no_grad():
        for p in add_lora(pipe.unet, rank=2, targets=WIDE):
            p.add_(0.05 * torch.randn_like(p))
    keys = list(lora_state_dict(pipe.unet))
    assert all(".lora_A." in k or ".lora_B." in k for k in keys) and any(".conv1." in k for k in keys)
    expected = _unet_out(pipe.unet)
    save_lora(pipe.unet, str(tmp_path / "wide"))
    stock = load_pipeline(tiny_model_dir)
    apply_lora(stock, str(tmp_path / "wide"), lora_scale=1.0)
    torch.testing.assert_close(_unet_out(stock.unet), expected, rtol=1e-4, atol=1e-5)
    resumed = load_pipeline(tiny_model_dir).unet  # fine-tuning's resume reads the same file into its adapter
    add_lora(resumed, rank=2, targets=WIDE)
    load_lora(resumed, str(tmp_path / "wide"))
    torch.testing.assert_close(_unet_out(resumed), expected)

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    mixed = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="default"))
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "mixed"), unet_lora_layers=mixed, safe_serialization=True)
    with pytest.raises(ValueError, match="the loader attached no adapter to"):
        apply_lora(load_pipeline(tiny_model_dir), str(tmp_path / "mixed"))
