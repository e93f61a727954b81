import pytest
import torch

from realfake_ray.method.speedups import apply_speedup, parse_speedup
from realfake_ray.config import ConfigError, GenerateConfig
from realfake_ray.stages.generate.plan import check_generate_config
from realfake_ray.models.tiny import build_random_tiny_pipeline
from realfake_ray.method.sampler import Sampler, SamplerSettings


@pytest.mark.parametrize("spec, expected", [("none", ("none", None)), ("deepcache", ("deepcache", 3.0)),
                                            ("deepcache:5", ("deepcache", 5.0)), ("tomesd:0.25", ("tomesd", 0.25))])
def test_parse(spec, expected):
    assert parse_speedup(spec) == expected


@pytest.mark.parametrize("spec", ["fastcache", "deepcache:0", "deepcache:2.5", "tomesd:1.5", "none:3", "deepcache:x"])
def test_bad_specs_are_errors_naming_the_value(spec):
    with pytest.raises(ValueError, match="speedup="):
        parse_speedup(spec)


def test_generate_config_checks_the_speedup():
    with pytest.raises(ConfigError, match="generate.speedup='deepcache:0'"):
        check_generate_config(GenerateConfig(speedup="deepcache:0", dtype="fp32"))
    with pytest.raises(ConfigError, match="does not compose with generate.compile"):
        check_generate_config(GenerateConfig(speedup="deepcache", compile=True, dtype="fp32"))


def _sampler(unet_layout: str = "sd"):
    torch.manual_seed(0)
    return Sampler(build_random_tiny_pipeline(unet_layout=unet_layout), SamplerSettings(steps=8, strength=1.0))


def _images(sampler):
    return sampler(prompts=["a photo of digit one", "a photo of digit two"], seeds=[0, 1], latent_mean=torch.zeros(2, 4, 8, 8))


def test_deepcache_runs_the_deep_blocks_every_nth_step_and_undoes_cleanly():
    sampler = _sampler()
    baseline = _images(sampler)
    calls = {"mid": 0}
    original = sampler.unet.mid_block.forward

    def counting(*args, **kwargs):
        calls["mid"] += 1
        return original(*args, **kwargs)

    sampler.unet.mid_block.forward = counting
    undo = apply_speedup(sampler, "deepcache:3")
    cached = _images(sampler)
    assert calls["mid"] == 3  # denoising steps 0, 3, 6 of 8 run the deep blocks; the others reuse them
    assert not (cached == baseline).all()
    undo()
    sampler.unet.mid_block.forward = original
    assert (_images(sampler) == baseline).all()


def test_tomesd_leaves_a_unet_without_full_resolution_attention_unchanged():
    sampler = _sampler("v1")
    baseline = _images(sampler)
    undo = apply_speedup(sampler, "tomesd:0.5")
    assert (_images(sampler) == baseline).all()  # the v1 UNet attends only at 1/2 resolution: nothing merged
    undo()


def test_speedups_refuse_compile():
    sampler = Sampler(build_random_tiny_pipeline(), SamplerSettings(steps=4, compile=True))
    with pytest.raises(ValueError, match="does not compose with compile"):
        apply_speedup(sampler, "deepcache")


def test_the_sd_layout_attends_where_sd_v15_does_so_lora_and_token_merging_reach_the_high_resolution():
    """The SD-shaped tiny UNet (UNET_LAYOUTS["sd"]): cross-attention at 8×8 and 4×4, none at 2×2, as SD v1.5 has
    it at 64/32/16 and not at 8; the LoRA's targets are there, ToMe now merges tokens (it changes the output,
    unlike on the v1 UNet above) and DeepCache still runs."""
    from realfake_ray.method.lora import add_lora

    pipe = build_random_tiny_pipeline()  # the default layout
    unet = pipe.unet
    assert [hasattr(b, "attentions") for b in unet.down_blocks] == [True, True, False]
    assert [hasattr(b, "attentions") for b in unet.up_blocks] == [False, True, True]
    add_lora(unet, rank=2)
    adapted = {n.split(".attentions")[0] for n, _ in unet.named_parameters() if "lora_A" in n}
    assert {"down_blocks.0", "down_blocks.1", "up_blocks.1", "up_blocks.2", "mid_block"} == adapted
    sampler = _sampler()
    baseline = _images(sampler)
    for spec in ("tomesd:0.5", "deepcache:3"):
        undo = apply_speedup(sampler, spec)
        assert not (_images(sampler) == baseline).all(), spec
        undo()
    assert (_images(sampler) == baseline).all()
    with pytest.raises(ValueError, match="unet_layout: 'sd2' is not one of"):
        build_random_tiny_pipeline(unet_layout="sd2")
