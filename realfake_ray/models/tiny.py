"""The tiny architecture: a Stable-Diffusion-shaped pipeline small enough for 2 CPU cores.

SD v1.5's components at toy size — a 32-px AutoencoderKL (4×8×8 latents), a text-conditioned
UNet2DConditionModel, a CLIP text encoder, a CLIP vision tower whose projection width equals the text
width (so its embedding fits the guidance-token slot), SD v1.5's noise schedule with UniPC. The CLIP
tokenizer's vocabulary is built here (byte-level BPE, merges learned from a built-in word list), so
nothing is downloaded.

This module only defines the architecture. ``--preset tiny`` uses the *pretrained* weights shipped
in ``realfake_ray/models/tiny_base`` (see :mod:`realfake_ray.models.pretrain`);
:func:`build_random_tiny_pipeline` gives the same architecture with random weights, for the
pretraining's starting point and for tests that only need shapes.

Example:
    >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
    >>> pipe = build_random_tiny_pipeline()
    >>> pipe.unet.config.sample_size, pipe.vae.config.latent_channels
    (8, 4)
"""

from __future__ import annotations

import json
import re

import torch

__all__ = [
    "TINY_RESOLUTION", "TINY_SEED", "TINY_WIDTH", "UNET_LAYOUTS", "build_tiny_tokenizer", "build_random_tiny_pipeline",
    "save_random_tiny_pipeline",
]

TINY_RESOLUTION = 32
TINY_SEED = 0
TINY_WIDTH = 64  # text hidden size == CLIP projection width (768 in SD v1.5)

# The UNet's levels on 8×8 latents. "sd" (the shipped base since v2): SD v1.5's pattern — cross-attention blocks
# at every level but the lowest (here 8×8 and 4×4, none at 2×2), attention in the middle block — so the LoRA's
# targets sit at the high resolutions, as on SD. "v1" (the first base): cross-attention only at 4×4 and in the
# middle block.
UNET_LAYOUTS: dict[str, dict] = {
    "v1": {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
           "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "block_out_channels": (64, 128)},
    "sd": {"down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           "block_out_channels": (64, 96, 128)},
}

# Words the tiny tokenizer learns merges for: prompts, class names, the negative prompt and the words of
# the pretraining corpus's captions (realfake_ray.data.corpus).
_CORPUS = """
photo of a digit zero one two three four five six seven eight nine best quality handwritten
distorted unrealistic blurry out frame cropped deformed picture image the and with in on
scan high low small large tilted left right slanted thick thin strokes sharp dark light contrast
noisy off centre bold italic serif sans typewriter old style
"""
_NUM_MERGES = 400


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """BPE merges (CLIP style: ``</w>`` marks a word's end) learned by ``tokenizers``' trainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_chars = list(_bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(byte_chars) + num_merges, initial_alphabet=byte_chars, end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges][:num_merges]


def build_tiny_tokenizer():
    """A CLIP tokenizer whose vocabulary (bytes, end-of-word bytes, learned merges, specials) we build."""
    from transformers import CLIPTokenizer

    byte_chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(re.findall(r"[a-z]+", _CORPUS), _NUM_MERGES)
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_random_tiny_pipeline(seed: int = TINY_SEED, unet_layout: str = "sd"):
    """The tiny SD architecture with random weights (seeded) and a CLIP image encoder component; the UNet's
    levels from :data:`UNET_LAYOUTS`."""
    if unet_layout not in UNET_LAYOUTS:
        raise ValueError(f"unet_layout: {unet_layout!r} is not one of {sorted(UNET_LAYOUTS)}")
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    tokenizer = build_tiny_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.18215,
    )
    latent_size = TINY_RESOLUTION // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        **UNET_LAYOUTS[unet_layout],
        layers_per_block=1,
        cross_attention_dim=TINY_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads: 4 heads of width 32
        norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TINY_WIDTH,
            intermediate_size=4 * TINY_WIDTH,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=TINY_WIDTH,
        )
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_WIDTH,
            intermediate_size=4 * TINY_WIDTH,
            num_attention_heads=4,
            num_hidden_layers=3,
            image_size=TINY_RESOLUTION,
            patch_size=4,
            projection_dim=TINY_WIDTH,
        )
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": TINY_RESOLUTION}, crop_size={"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    )
    # SD v1.5's noise schedule, with UniPC as the sampler (as in the method's generation recipe).
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=feature_extractor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    )


def save_random_tiny_pipeline(directory: str) -> str:
    """Write the random-weight tiny pipeline to a local ``directory`` in the standard diffusers format."""
    build_random_tiny_pipeline().save_pretrained(directory, safe_serialization=True)
    return directory
