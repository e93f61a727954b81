"""Pretrain the tiny base model on the printed-digit corpus (pure torch/diffusers/transformers; no Ray).

The analogue of "SD v1.5, pretrained on a web corpus": every component of the tiny architecture
(:mod:`realfake_ray.models.tiny`) is trained from scratch on :class:`~realfake_ray.data.corpus.DigitCorpus`
only — never on the real handwritten digits that Real-Fake later adapts it to:

1. the VAE (``AutoencoderKL``): L1 + L2 reconstruction + a small KL term; the latent scaling factor
   is set afterwards as SD's was, 1 / std of the corpus latents;
2. the CLIP text and vision towers: contrastive image↔caption (InfoNCE, learned temperature). The
   text projection is fixed to the identity, so an image embedding lives in the text encoder's own
   hidden space — where the guidance token is written — and the vision projection is rescaled so its
   embeddings have the norm of the text states;
3. the UNet: text-conditioned latent diffusion (ε-prediction, SD v1.5's noise schedule), Min-SNR-γ
   weighted, captions dropped to "" 10 % of the time so classifier-free guidance works, EMA weights.

Output: the stock diffusers layout with ``image_encoder`` (``StableDiffusionPipeline.from_pretrained``
loads it), fp16 safetensors, ``training.json`` (corpus, steps, losses, wall time, machine) and a model
card ``README.md``.

Example:
    >>> from realfake_ray.models.pretrain import PretrainConfig, pretrain_base
    >>> record = pretrain_base("/tmp/tiny-base", PretrainConfig(corpus_size=200, vae_steps=2,
    ...                        clip_steps=2, unet_steps=2))  # doctest: +SKIP
    >>> sorted(record["phases"])  # doctest: +SKIP
    ['clip', 'corpus', 'unet', 'vae']
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from realfake_ray.data.corpus import CLASS_NAMES, DigitCorpus
from realfake_ray.method.losses import denoising_loss, min_snr_weights
from realfake_ray.models.tiny import UNET_LAYOUTS, build_random_tiny_pipeline
from realfake_ray.method.prompts import build_prompt, tokenize
from realfake_ray.seeds import derive_seed

__all__ = ["PretrainConfig", "clip_zero_shot", "pretrain_base", "render_corpus"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults (OpenAI CLIP)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run (recorded in ``training.json``)."""

    seed: int = 0
    corpus_size: int = 60_000  # training images; a further `holdout_size` are held out for checks
    holdout_size: int = 2_000
    vae_steps: int = 800
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6  # on the KL summed over latent elements, next to per-pixel mean L1 + L2
    clip_steps: int = 1_000
    clip_batch: int = 256
    clip_lr: float = 2e-3
    unet_steps: int = 8_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    unet_layout: str = "sd"  # the UNet's levels (realfake_ray.models.tiny.UNET_LAYOUTS)
    # A base directory pretrained on the same corpus: its VAE, CLIP towers and tokenizer are taken as they are
    # (they are frozen while the UNet trains anyway) and only the UNet is trained. None: train every component.
    encoders_from: str | None = None

    def steps(self) -> dict[str, int]:
        return {"vae": self.vae_steps, "clip": self.clip_steps, "unet": self.unet_steps}


# ---------------------------------------------------------------------------------------------- corpus


def _render_slice(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    seed, start, stop = args
    return DigitCorpus(seed).batch(range(start, stop))


def render_corpus(seed: int, start: int, stop: int, processes: int = 2) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``start..stop`` of the corpus ``seed`` (uint8 [N,32,32,3], labels, captions), in parallel.

    Example:
        >>> images, labels, captions = render_corpus(0, 0, 20, processes=1)
        >>> images.shape, labels[:2].tolist()
        ((20, 32, 32, 3), [0, 1])
    """
    bounds = list(range(start, stop, 2_000)) + [stop]
    jobs = [(seed, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if processes <= 1 or len(jobs) == 1:
        parts = [_render_slice(j) for j in jobs]
    else:
        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_render_slice, jobs))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [c for p in parts for c in p[2]])


def _to_vae_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _to_clip_input(images: np.ndarray) -> torch.Tensor:
    """What ``CLIPImageProcessor`` makes of a 32-px image (no resize or crop needed), as a tensor."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------- training


def _schedule(optimizer, steps: int):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)


def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    """``steps`` index batches: fresh permutations of range(n), concatenated."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch]
        order = order[batch:]


def _loop(name: str, steps: int, step_fn: Callable[[torch.Tensor], dict], n: int, batch: int, seed: int) -> dict:
    """Run ``step_fn`` over ``steps`` random batches with a progress bar; returns the phase's record."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "pretrain", name) % 2**63)
    started, window, history = time.perf_counter(), [], []
    bar = tqdm(total=steps, desc=f"pretrain {name}", unit="step", mininterval=5.0)
    for step, index in enumerate(_batches(n, batch, steps, generator), start=1):
        stats = step_fn(index)
        window.append(stats)
        if step % 50 == 0 or step == steps:
            row = {"step": step, **{k: float(np.mean([s[k] for s in window])) for k in window[0]}}
            history.append(row)
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "step"}, refresh=False)
            window = []
        bar.update(1)
    bar.close()
    return {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - started, 1),
            "final": history[-1] if history else {}, "history": history}


def train_vae(vae, images: np.ndarray, cfg: PretrainConfig) -> dict:
    """Train the AutoencoderKL in place, then set its scaling factor to 1 / std of the corpus latents."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = _schedule(optimizer, cfg.vae_steps)
    sample_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "vae-sample") % 2**63)

    def step(index: torch.Tensor) -> dict:
        x = _to_vae_input(images[index.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=sample_gen)
        recon = vae.decode(z).sample
        l1, l2 = (recon - x).abs().mean(), (recon - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = l1 + l2 + cfg.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        return {"l1": l1.item(), "mse": l2.item(), "kl": kl.item()}

    record = _loop("vae", cfg.vae_steps, step, len(images), cfg.vae_batch, cfg.seed)
    vae.eval().requires_grad_(False)
    means = encode_latent_means(vae, images[:4096], scaling=1.0)
    std = float(means.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    record["latent_std"], record["scaling_factor"] = std, vae.config.scaling_factor
    return record


@torch.no_grad()
def encode_latent_means(vae, images: np.ndarray, scaling: float | None = None, batch: int = 512) -> torch.Tensor:
    """Posterior means of ``images`` (uint8 NHWC) times ``scaling`` (default: the VAE's scaling factor)."""
    scaling = vae.config.scaling_factor if scaling is None else scaling
    out = [vae.encode(_to_vae_input(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)]
    return torch.cat(out) * scaling


def text_embeds(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP text embeddings with the identity projection: the final-layer state at the EOS token."""
    return text_encoder(input_ids=input_ids).pooler_output


def train_clip(text_encoder, image_encoder, tokenizer, images: np.ndarray, captions: list[str], cfg: PretrainConfig) -> dict:
    """Contrastive training of the text and vision towers in place (see the module docstring)."""
    text_encoder.train().requires_grad_(True)
    image_encoder.train().requires_grad_(True)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text_encoder.parameters(), *image_encoder.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.1)
    schedule = _schedule(optimizer, cfg.clip_steps)
    ids = tokenize(tokenizer, captions)
    # The causal mask keeps the EOS state independent of the padding after it: train on the used columns only.
    ids = ids[:, : int((ids != tokenizer.pad_token_id).sum(1).max()) + 1]

    def step(index: torch.Tensor) -> dict:
        text = F.normalize(text_embeds(text_encoder, ids[index]), dim=-1)
        image = F.normalize(image_encoder(pixel_values=_to_clip_input(images[index.numpy()])).image_embeds, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * image @ text.T
        target = torch.arange(len(index))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        return {"loss": loss.item(), "acc": (logits.argmax(1) == target).float().mean().item()}

    record = _loop("clip", cfg.clip_steps, step, len(images), cfg.clip_batch, cfg.seed)
    text_encoder.eval().requires_grad_(False)
    image_encoder.eval().requires_grad_(False)
    record["embed_norm_ratio"] = _match_embedding_norms(text_encoder, image_encoder, tokenizer, images[:2048], captions[:2048])
    record["logit_scale"] = float(logit_scale.detach().exp())
    return record


@torch.no_grad()
def _match_embedding_norms(text_encoder, image_encoder, tokenizer, images: np.ndarray, captions: list[str]) -> float:
    """Scale the vision projection so image embeddings have the mean norm of the text states."""
    text = text_embeds(text_encoder, tokenize(tokenizer, captions)).norm(dim=-1).mean()
    image = image_encoder(pixel_values=_to_clip_input(images)).image_embeds.norm(dim=-1).mean()
    ratio = float(text / image)
    image_encoder.visual_projection.weight.mul_(ratio)
    return ratio


@torch.no_grad()
def clip_zero_shot(text_encoder, image_encoder, tokenizer, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of "photo of digit k" zero-shot classification with the tiny CLIP (cosine similarity).

    Example:
        >>> clip_zero_shot(pipe.text_encoder, pipe.image_encoder, pipe.tokenizer, images, labels)  # doctest: +SKIP
        0.97
    """
    prompts = [build_prompt(name) for name in CLASS_NAMES]
    text = F.normalize(text_embeds(text_encoder, tokenize(tokenizer, prompts)), dim=-1)
    correct = 0
    for i in range(0, len(images), 512):
        image = F.normalize(image_encoder(pixel_values=_to_clip_input(images[i : i + 512])).image_embeds, dim=-1)
        correct += int(((image @ text.T).argmax(1).numpy() == labels[i : i + 512]).sum())
    return correct / max(len(images), 1)


def train_unet(unet, vae, text_encoder, tokenizer, scheduler, images: np.ndarray, captions: list[str],
               cfg: PretrainConfig) -> dict:
    """Text-conditioned latent diffusion on the corpus (frozen VAE and text encoder); EMA weights at the end."""
    from diffusers.training_utils import EMAModel

    with torch.no_grad():
        posteriors = [vae.encode(_to_vae_input(images[i : i + 512])).latent_dist for i in range(0, len(images), 512)]
    scaling = float(vae.config.scaling_factor)
    means = torch.cat([p.mean for p in posteriors]) * scaling
    stds = torch.cat([p.std for p in posteriors]) * scaling
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    schedule = _schedule(optimizer, cfg.unet_steps)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "unet-noise") % 2**63)
    alphas_cumprod = scheduler.alphas_cumprod

    def step(index: torch.Tensor) -> dict:
        n = len(index)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
        batch_ids = ids[index].clone()
        batch_ids[torch.rand(n, generator=gen) < cfg.caption_dropout] = empty
        with torch.no_grad():
            hidden = text_encoder(batch_ids)[0]
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
        loss = denoising_loss(pred, noise, min_snr_weights(t, alphas_cumprod, cfg.snr_gamma))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.step(unet.parameters())
        return {"loss": loss.item()}

    record = _loop("unet", cfg.unet_steps, step, len(images), cfg.unet_batch, cfg.seed)
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return record


# ------------------------------------------------------------------------------------------- the run


def _machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def pretrain_base(out_dir: str, cfg: PretrainConfig | None = None, log: Callable[[str], None] = print) -> dict:
    """Pretrain every component on the corpus and save the pipeline (fp16) to ``out_dir``; returns the record.

    Example:
        >>> pretrain_base("/tmp/tiny-base")["phases"]["unet"]["final"]["loss"]  # doctest: +SKIP
        0.21
    """
    from diffusers import DDPMScheduler

    cfg = cfg or PretrainConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.time()
    torch.manual_seed(derive_seed(cfg.seed, "pretrain-init") % 2**63)
    pipe = build_random_tiny_pipeline(seed=cfg.seed, unet_layout=cfg.unet_layout)
    t0 = time.perf_counter()
    images, labels, captions = render_corpus(cfg.seed, 0, cfg.corpus_size + cfg.holdout_size)
    held = slice(cfg.corpus_size, None)
    train_images, train_captions = images[: cfg.corpus_size], captions[: cfg.corpus_size]
    corpus = DigitCorpus(cfg.seed)
    phases = {"corpus": {"images": cfg.corpus_size, "holdout": cfg.holdout_size, "fonts": len(corpus.fonts),
                         "identity": corpus.identity(), "seconds": round(time.perf_counter() - t0, 1)}}
    log(f"[pretrain] corpus: {cfg.corpus_size} + {cfg.holdout_size} images from {len(corpus.fonts)} fonts")
    if cfg.encoders_from:
        phases.update(reuse_encoders(pipe, cfg.encoders_from, cfg.seed, corpus.identity()))
        log(f"[pretrain] vae, clip: taken from {cfg.encoders_from}")
    else:
        phases["vae"] = train_vae(pipe.vae, train_images, cfg)
        phases["vae"]["holdout_psnr"] = vae_psnr(pipe.vae, images[held])
        log(f"[pretrain] vae: holdout PSNR {phases['vae']['holdout_psnr']:.2f} dB, scaling {pipe.vae.config.scaling_factor}")
        phases["clip"] = train_clip(pipe.text_encoder, pipe.image_encoder, pipe.tokenizer, train_images, train_captions, cfg)
        phases["clip"]["holdout_zero_shot"] = clip_zero_shot(pipe.text_encoder, pipe.image_encoder, pipe.tokenizer,
                                                             images[held], labels[held])
        log(f"[pretrain] clip: holdout zero-shot top-1 {phases['clip']['holdout_zero_shot']:.3f}")
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    phases["unet"] = train_unet(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, ddpm, train_images,
                                train_captions, cfg)
    log(f"[pretrain] unet: final loss {phases['unet']['final'].get('loss', float('nan')):.4f}")
    record = {"config": dataclasses.asdict(cfg), "phases": phases, "wall_seconds": round(time.time() - started, 1),
              "machine": _machine(), "created": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    save_base(pipe, out_dir, record)
    return record


def reuse_encoders(pipe, base_dir: str, seed: int, corpus_identity: str) -> dict:
    """Put ``base_dir``'s VAE, CLIP towers and tokenizer into ``pipe`` (fp32); their phases' records, marked
    ``reused_from``. Refuses a base pretrained on another corpus (seed or fonts): its latents and embeddings
    would not be the ones this UNet learns on."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    with open(os.path.join(base_dir, "training.json")) as f:
        record = json.load(f)
    theirs = (record["config"]["seed"], record["phases"]["corpus"]["identity"])
    if theirs != (seed, corpus_identity):
        raise ValueError(f"encoders_from {base_dir}: pretrained on corpus (seed, identity) {theirs}, this run's is "
                         f"{(seed, corpus_identity)}")
    fp32 = {"torch_dtype": torch.float32}
    pipe.register_modules(
        vae=AutoencoderKL.from_pretrained(base_dir, subfolder="vae", **fp32).eval().requires_grad_(False),
        text_encoder=CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder", **fp32).eval().requires_grad_(False),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(base_dir, subfolder="image_encoder", **fp32).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(base_dir, subfolder="tokenizer"),
    )
    return {phase: {**{k: v for k, v in record["phases"][phase].items() if k != "history"}, "reused_from": base_dir}
            for phase in ("vae", "clip")}


@torch.no_grad()
def vae_psnr(vae, images: np.ndarray, batch: int = 512) -> float:
    """Mean PSNR (dB, pixel range [0, 255]) of VAE reconstructions (posterior mean) of uint8 NHWC ``images``."""
    scores = []
    for i in range(0, len(images), batch):
        x = _to_vae_input(images[i : i + batch])
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        scores.append(10 * torch.log10(1.0 / mse))
    return float(torch.cat(scores).mean())


def save_base(pipe, out_dir: str, record: dict) -> None:
    """The pipeline in fp16 safetensors (stock diffusers layout), ``training.json`` and a model card."""
    components = [pipe.vae, pipe.unet, pipe.text_encoder, pipe.image_encoder]
    for module in components:
        module.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for module in components:
        module.to(torch.float32)
    slim = json.loads(json.dumps(record))
    for phase in slim["phases"].values():
        phase.pop("history", None)
    with open(os.path.join(out_dir, "training.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_model_card(slim))


def _layout_text(layout: str) -> str:
    """``"channels 64/96/128, cross-attention at 8×8, 4×4 and in the middle block"`` for a UNet layout."""
    spec, side, where = UNET_LAYOUTS[layout], 8, []
    for kind in spec["down_block_types"]:
        where += [f"{side}×{side}"] if kind.startswith("CrossAttn") else []
        side //= 2
    return f"channels {'/'.join(map(str, spec['block_out_channels']))}, cross-attention at {', '.join(where)} and in the middle block"


def _model_card(record: dict) -> str:
    p, c = record["phases"], record["config"]
    return f"""# realfake-ray tiny base (32 px, Stable Diffusion architecture)

The offline stand-in for Stable Diffusion v1.5 that `--preset tiny` uses: every component was trained
from scratch by `realfake pretrain-base` on a corpus of **printed** digits rendered from the fonts that
matplotlib ships (`realfake_ray.data.corpus`), with captions built from each rendering. It has never
seen the real handwritten digits of the embedded dataset; Real-Fake adapts it to them.

| component | architecture | training |
|---|---|---|
| vae | AutoencoderKL, 32 px → 4×8×8 latents | {c['vae_steps']} steps × {c['vae_batch']}; holdout PSNR {p['vae'].get('holdout_psnr', float('nan')):.2f} dB; scaling factor {p['vae'].get('scaling_factor')} |
| text_encoder, image_encoder | CLIP text + vision towers, width 64 | contrastive, {c['clip_steps']} steps × {c['clip_batch']}; zero-shot top-1 on held-out corpus {p['clip'].get('holdout_zero_shot', float('nan')):.3f} |
| unet | UNet2DConditionModel, 8×8 latents, layout `{c.get('unet_layout', 'v1')}`: {_layout_text(c.get('unet_layout', 'v1'))}, text width 64 | ε-prediction, Min-SNR-γ {c['snr_gamma']}, caption dropout {c['caption_dropout']}, EMA {c['ema_decay']}; {c['unet_steps']} steps × {c['unet_batch']} |
| scheduler | UniPC with SD v1.5's scaled-linear β schedule | — |

Corpus: seed {c['seed']}, {c['corpus_size']:,} training + {c['holdout_size']:,} held-out images, {p['corpus']['fonts']} fonts
(identity `{p['corpus']['identity']}`). Wall time {record['wall_seconds'] / 60:.1f} min on {record['machine']['cpus']} CPUs
({record['machine']['processor']}, torch {record['machine']['torch']}). Full record: `training.json`.
Retrain: `realfake pretrain-base --out DIR` (then `--set model.pretrained=DIR`).
"""
