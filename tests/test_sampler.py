"""Sampler tests on the tiny preset (fp32, CPU, few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from realfake_ray.method.prompts import NEGATIVE_PROMPT, tokenize
from realfake_ray.method.sampler import DTYPES, SCHEDULERS, Sampler, SamplerSettings, latent_hw, make_scheduler
from realfake_ray.method.vision_token import encode_text
from realfake_ray.models.loading import load_pipeline
from realfake_ray.models.tiny import build_random_tiny_pipeline
from realfake_ray.tools.sampler_bench import format_table, make_grid, run_grid

FAST = {"steps": 4, "strength": 0.5}  # 2 UNet calls per image batch


@pytest.fixture(scope="module")
def pipe():
    return build_random_tiny_pipeline()


def make_inputs(n: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "prompts": [f"photo of {w}, best quality" for w in ("one", "two", "three", "four")[:n]],
        "seeds": list(range(100, 100 + n)),
        "latent_mean": torch.randn(n, 4, 8, 8, generator=gen),
        "latent_std": 0.1 * torch.rand(n, 4, 8, 8, generator=gen),
        "vision_tokens": torch.randn(n, 64, generator=gen),
    }


def pick(inputs: dict, i: int) -> dict:
    """Image i of a batch as a batch of one."""
    return {k: v[i : i + 1] for k, v in inputs.items()}


class UNetCalls:
    """Counts UNet forwards and records their batch sizes."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_hook(lambda mod, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_output_shape_and_dtype(pipe):
    images = Sampler(pipe, SamplerSettings(**FAST))(**make_inputs(2))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_same_seeds_identical_different_seed_differs(pipe):
    sampler = Sampler(pipe, SamplerSettings(**FAST))
    inputs = make_inputs(2)
    first, again = sampler(**inputs), sampler(**inputs)
    np.testing.assert_array_equal(first, again)
    other = sampler(**(inputs | {"seeds": [7, 8]}))
    assert not np.array_equal(first, other)


def test_image_independent_of_batch(pipe):
    # Bit-identical on this machine's CPU kernels; a different BLAS may blocking-order the batched
    # matmuls differently, so allow a 1/255 difference in a few pixels rather than demand bit equality.
    sampler = Sampler(pipe, SamplerSettings(**FAST))
    inputs = make_inputs(3)
    batched = sampler(**inputs)
    alone = sampler(**pick(inputs, 1))
    diff = np.abs(batched[1].astype(int) - alone[0].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("scheduler", ["unipc", "ddim"])
@pytest.mark.parametrize(("steps", "strength", "expected"), [(8, 0.5, 4), (10, 0.75, 7), (3, 1.0, 3)])
def test_img2img_unet_call_count(pipe, scheduler, steps, strength, expected):
    sampler = Sampler(pipe, SamplerSettings(scheduler=scheduler, steps=steps, strength=strength))
    with UNetCalls(pipe.unet) as calls:
        sampler(**make_inputs(1))
    assert len(calls.batches) == expected and set(calls.batches) == {2}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_timesteps_match_diffusers_img2img(pipe, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    sampler = Sampler(pipe, SamplerSettings(scheduler=scheduler, steps=30, strength=0.75))
    ours = sampler._timesteps()
    ref_pipe = StableDiffusionImg2ImgPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=make_scheduler(scheduler, pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ref_pipe.scheduler.set_timesteps(30)
    theirs, n = ref_pipe.get_timesteps(30, 0.75, "cpu")
    assert len(ours) == n == 22
    torch.testing.assert_close(ours, theirs)


def test_txt2img(pipe):
    sampler = Sampler(pipe, SamplerSettings(mode="txt2img", steps=3))
    inputs = make_inputs(2)
    del inputs["latent_mean"], inputs["latent_std"]
    with UNetCalls(pipe.unet) as calls:
        images = sampler(**inputs)
    assert images.shape == (2, 32, 32, 3) and len(calls.batches) == 3
    assert latent_hw(pipe) == (8, 8)


def test_guidance_token_changes_output(pipe):
    sampler = Sampler(pipe, SamplerSettings(**FAST))
    inputs = make_inputs(1)
    with_token = sampler(**inputs)
    text_only = sampler(**(inputs | {"vision_tokens": None}))
    assert not np.array_equal(with_token, text_only)


def test_sample_posterior_changes_start(pipe):
    inputs = make_inputs(1) | {"latent_std": torch.ones(1, 4, 8, 8)}
    posterior = Sampler(pipe, SamplerSettings(**FAST))(**inputs)
    mean_only = Sampler(pipe, SamplerSettings(**FAST, sample_posterior=False))(**inputs)
    assert not np.array_equal(posterior, mean_only)


def test_guidance_scale_one_skips_uncond_branch(pipe):
    with UNetCalls(pipe.unet) as calls:
        Sampler(pipe, SamplerSettings(**FAST, guidance_scale=1.0))(**make_inputs(3))
    assert calls.batches == [3, 3]
    with UNetCalls(pipe.unet) as calls:
        Sampler(pipe, SamplerSettings(**FAST, guidance_scale=2.0))(**make_inputs(3))
    assert calls.batches == [6, 6]


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_runs(pipe, scheduler):
    sampler = Sampler(pipe, SamplerSettings(scheduler=scheduler, **FAST))
    assert sampler(**make_inputs(1)).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("scheduler", "pndm", "scheduler"),
        ("mode", "inpaint", "mode"),
        ("dtype", "fp8", "dtype"),
        ("steps", 0, "steps"),
        ("steps", 2.5, "steps"),
        ("strength", 0.0, "strength"),
        ("strength", 1.5, "strength"),
        ("guidance_scale", 0.5, "guidance_scale"),
        ("guidance_scale", float("nan"), "guidance_scale"),
    ],
)
def test_bad_settings_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**{field: value}).validate()


def test_zero_denoising_steps_raise():
    with pytest.raises(ValueError, match="0 denoising steps"):
        SamplerSettings(steps=1, strength=0.5).validate()


def test_make_scheduler_lists_valid_names(pipe):
    with pytest.raises(ValueError, match="dpmpp_2m_karras"):
        make_scheduler("heun", pipe.scheduler.config)
    dpm = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
    assert dpm.config.use_karras_sigmas and dpm.config.algorithm_type == "dpmsolver++"
    ddim = make_scheduler("ddim", pipe.scheduler.config)
    assert not ddim.config.clip_sample and not ddim.config.set_alpha_to_one


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seeds": [1]}, "seed"),
        ({"latent_mean": torch.zeros(2, 3, 8, 8)}, "latent_mean"),
        ({"latent_mean": None}, "latent_mean"),
        ({"latent_std": torch.zeros(2, 4, 4, 4)}, "latent_std"),
        ({"vision_tokens": torch.zeros(2, 16)}, "vision_tokens"),
    ],
)
def test_bad_inputs_raise(pipe, change, match):
    sampler = Sampler(pipe, SamplerSettings(**FAST))
    with pytest.raises(ValueError, match=match):
        sampler(**(make_inputs(2) | change))


def _save_lora(unet, directory) -> None:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    with torch.no_grad():  # peft starts lora_B at zero (a no-op LoRA); make it do something
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=get_peft_model_state_dict(unet))


def test_lora_is_fused_and_changes_output(tmp_path):
    _save_lora(build_random_tiny_pipeline().unet, tmp_path)
    inputs = make_inputs(1)
    base = Sampler(build_random_tiny_pipeline(), SamplerSettings(**FAST))(**inputs)
    lora_pipe = build_random_tiny_pipeline()
    tuned = Sampler.from_pipeline(lora_pipe, SamplerSettings(**FAST), lora_dir=str(tmp_path), lora_scale=0.5)(**inputs)
    assert not np.array_equal(base, tuned)
    assert not any("lora" in name for name, _ in lora_pipe.unet.named_parameters())  # fused, adapters gone
    q_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    fused_q = dict(lora_pipe.unet.named_parameters())[q_name]
    assert not torch.equal(fused_q, dict(build_random_tiny_pipeline().unet.named_parameters())[q_name])


def test_lora_shape_mismatch_names_file(tmp_path):
    from diffusers import UNet2DConditionModel

    config = build_random_tiny_pipeline().unet.config
    width = config.block_out_channels[-1]
    other = UNet2DConditionModel.from_config(config, block_out_channels=(*config.block_out_channels[:-1], width + 16))
    _save_lora(other, tmp_path)
    with pytest.raises(ValueError, match=rf"pytorch_lora_weights\.safetensors.*input width {width + 16}.*has {width}"):
        Sampler.from_pipeline(build_random_tiny_pipeline(), SamplerSettings(**FAST), lora_dir=str(tmp_path))


def test_missing_lora_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Sampler.from_pipeline(build_random_tiny_pipeline(), SamplerSettings(**FAST), lora_dir=str(tmp_path / "nowhere"))


def test_run_grid_tiny_cpu(pipe):
    grid = make_grid(steps=(2,), batch_sizes=(1,), dtypes=("fp32",), strength=1.0)
    rows = run_grid(pipe, grid, device="cpu", iters=1, warmup=0)
    assert rows[0]["images_per_s"] > 0 and rows[0]["tflop_per_img"] > 0 and rows[0]["mfu"] is None
    assert rows[1]["name"] == "reference" and rows[1]["note"].startswith("skipped")
    assert "images_per_s" in format_table(rows).splitlines()[0]
    with pytest.raises(ValueError, match="unknown keys"):
        run_grid(pipe, [{"batch": 2}], device="cpu")


def test_channels_last_matches_default(pipe):
    inputs = make_inputs(1)
    default = Sampler(pipe, SamplerSettings(**FAST))(**inputs)
    channels_last = Sampler(pipe, SamplerSettings(**FAST, channels_last=True))(**inputs)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(default.astype(int) - channels_last.astype(int)).max() <= 1
    Sampler(pipe, SamplerSettings(**FAST))  # back to the default layout
    assert pipe.unet.conv_in.weight.is_contiguous()


@pytest.mark.parametrize("negative_token", [False, True])
def test_guidance_token_reaches_the_negative_branch_only_when_asked(pipe, negative_token):
    inputs = make_inputs(2)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        Sampler(pipe, SamplerSettings(**FAST, negative_vision_token=negative_token))(**inputs)
    finally:
        handle.remove()
    negative, cond = seen[0].chunk(2)  # one UNet call holds [negative branch, conditional branch]
    tokens = inputs["vision_tokens"]
    assert torch.allclose(cond[:, -1], tokens)
    assert torch.allclose(negative[:, -1], tokens) == negative_token
    assert torch.equal(negative[:, :-1], negative[:1, :-1].expand(2, -1, -1))  # the negative prompt's states


# ---------------------------------------------------------------------------------------- speed options

def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int))


@pytest.mark.parametrize("option", [{"sdpa_backend": "math"}, {"sdpa_backend": "flash"}, {"fuse_qkv": True}])
def test_exact_speed_options_leave_the_images_unchanged(pipe, option):
    """Reformulations of the same arithmetic: at most 1/255 in under 1 % of the pixels (the tolerance of
    test_image_independent_of_batch; on this machine's CPU kernels they are bit-identical)."""
    inputs = make_inputs(3)
    default = Sampler(pipe, SamplerSettings(**FAST))(**inputs)
    diff = _diff(Sampler(pipe, SamplerSettings(**FAST, **option))(**inputs), default)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("vae_dtype", ["bf16", "fp16"])
def test_vae_dtype_changes_pixels_within_its_precision(pipe, vae_dtype):
    """Decoding in 16 bits: at most 4/255 anywhere and 0.5/255 on average (measured on this pipeline:
    bf16 max 3, mean 0.36; fp16 max 2, mean 0.17)."""
    inputs = make_inputs(3)
    default = Sampler(pipe, SamplerSettings(**FAST))(**inputs)
    sampler = Sampler(pipe, SamplerSettings(**FAST, vae_dtype=vae_dtype))
    assert pipe.vae.dtype == DTYPES[vae_dtype] and pipe.unet.dtype == torch.float32
    diff = _diff(sampler(**inputs), default)
    assert diff.max() <= 4 and diff.mean() <= 0.5
    Sampler(pipe, SamplerSettings(**FAST))
    assert pipe.vae.dtype == torch.float32  # the next Sampler puts the VAE back in its dtype


def test_fuse_qkv_runs_the_fused_projections_and_is_undone(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

    sampler = Sampler(pipe, SamplerSettings(**FAST, fuse_qkv=True))
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    fused = [m for m in pipe.unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    calls = []
    handles = [m.get_submodule("to_qkv" if hasattr(m, "to_qkv") else "to_kv").register_forward_hook(
        lambda *_: calls.append(1)) for m in fused]
    try:
        sampler(**make_inputs(1))
    finally:
        for handle in handles:
            handle.remove()
    assert fused and len(calls) == 2 * len(fused)  # every fused projection, in each of the 2 denoising steps
    Sampler(pipe, SamplerSettings(**FAST))
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}


@pytest.mark.parametrize(("backend", "flash", "math"), [("math", False, True), ("flash", True, False), ("auto", True, True)])
def test_sdpa_backend_is_in_force_during_the_unet_calls(pipe, backend, flash, math):
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda *_: seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())))
    try:
        Sampler(pipe, SamplerSettings(**FAST, sdpa_backend=backend))(**make_inputs(1))
    finally:
        handle.remove()
    assert set(seen) == {(flash, math)}
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()  # restored after


@pytest.mark.parametrize("settings", [{"compile": True, "compile_mode": "reduce-overhead"},
                                      {"compile": True, "compile_mode": "max-autotune"},
                                      {"sdpa_backend": "efficient"}, {"sdpa_backend": "cudnn"}])
def test_cuda_only_options_are_refused_on_cpu_and_dropped_by_for_cpu(pipe, settings):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Sampler(pipe, SamplerSettings(**FAST, **settings), "cpu")
    on_cpu = SamplerSettings(**FAST, **settings, dtype="bf16", vae_dtype="bf16").for_cpu()
    assert on_cpu.cuda_only() == [] and (on_cpu.dtype, on_cpu.vae_dtype) == ("fp32", None)
    assert on_cpu.compile == settings.get("compile", False)


def test_compile_mode_reaches_torch_compile_with_static_shapes(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: calls.append(kwargs) or module)
    Sampler(pipe, SamplerSettings(**FAST, compile=True, compile_mode="max-autotune-no-cudagraphs"))
    Sampler(pipe, SamplerSettings(**FAST))
    assert calls == [{"mode": "max-autotune-no-cudagraphs", "dynamic": False}]


def test_vae_tiling_and_slicing_are_turned_off(pipe):
    pipe.vae.enable_tiling()
    pipe.vae.enable_slicing()
    Sampler(pipe, SamplerSettings(**FAST))
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing


@pytest.mark.parametrize(("field", "value", "match"), [("compile_mode", "fast", "compile_mode"),
                                                       ("sdpa_backend", "xformers", "sdpa_backend"),
                                                       ("vae_dtype", "fp8", "vae_dtype")])
def test_bad_speed_options_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplerSettings(**{field: value}).validate()
    with pytest.raises(ValueError, match="needs compile=True"):
        SamplerSettings(compile_mode="reduce-overhead").validate()


# ------------------------------------------------------------------- parity with diffusers' own img2img


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    """The shipped (pretrained) tiny base: pictures, not noise, so that a difference would show."""
    return load_pipeline(tiny_model_dir)


def _diffusers_img2img(pipe, settings: SamplerSettings, inputs: dict, **prompting) -> np.ndarray:
    """Stock ``StableDiffusionImg2ImgPipeline`` over the same modules, scheduler and per-image generators, from
    the bank latent as its init latent (a 4-channel ``image`` is taken as latents); uint8 like the Sampler."""
    from diffusers import StableDiffusionImg2ImgPipeline

    stock = StableDiffusionImg2ImgPipeline(
        **{k: getattr(pipe, k) for k in ("vae", "text_encoder", "tokenizer", "unet")},
        scheduler=make_scheduler(settings.scheduler, pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    stock.set_progress_bar_config(disable=True)
    generators = []
    for seed in inputs["seeds"]:  # the Sampler draws each image's posterior noise first (unused without a std)
        generator = torch.Generator().manual_seed(seed)
        torch.randn(inputs["latent_mean"].shape[1:], generator=generator)
        generators.append(generator)
    images = stock(image=inputs["latent_mean"], strength=settings.strength, num_inference_steps=settings.steps,
                   guidance_scale=settings.guidance_scale, generator=generators, output_type="np", **prompting).images
    return (images * 255).round().astype(np.uint8)


def test_sampler_equals_diffusers_img2img_with_the_vision_token(base):
    """Same latents, prompt embeddings (the vision token in the last slot), scheduler and generators: the
    same pixels as diffusers' own pipeline, within 1/255."""
    settings = SamplerSettings(steps=10, strength=0.75, guidance_scale=2.0)
    inputs = make_inputs(3) | {"latent_std": None}
    ours = Sampler(base, settings)(**inputs)
    ids = tokenize(base.tokenizer, inputs["prompts"])
    with torch.no_grad():
        prompt_embeds = encode_text(base.text_encoder, ids, inputs["vision_tokens"])
        negative_embeds = encode_text(base.text_encoder, tokenize(base.tokenizer, [NEGATIVE_PROMPT] * 3))
    theirs = _diffusers_img2img(base, settings, inputs, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds)
    assert ours.shape == theirs.shape == (3, 32, 32, 3)
    assert _diff(ours, theirs).max() <= 1
    assert ours.std() > 10  # pictures, not a flat field


@pytest.mark.parametrize("scheduler", ["unipc", "ddim"])
def test_sampler_equals_diffusers_img2img_with_its_own_prompt_encoding(base, scheduler):
    """Without a vision token the prompts go in as text: diffusers encodes them (and the negative prompt) itself."""
    settings = SamplerSettings(scheduler=scheduler, steps=8, strength=0.5, guidance_scale=3.0)
    inputs = make_inputs(2) | {"latent_std": None, "vision_tokens": None}
    ours = Sampler(base, settings)(**inputs)
    theirs = _diffusers_img2img(base, settings, inputs, prompt=inputs["prompts"], negative_prompt=[NEGATIVE_PROMPT] * 2)
    assert _diff(ours, theirs).max() <= 1
