"""Quality checks of the tiny base model (pure torch; used by its benchmark and its tests).

The base stands in for SD v1.5, so its checks ask what one would ask of SD v1.5: does text conditioning
work (txt2img "photo of digit k" is recognised as k by a classifier trained on the corpus), does the
VAE reconstruct images it never saw (the real handwritten digits), and does the CLIP pair align images
with their class text (zero-shot).

Example:
    >>> judge = train_corpus_judge(seed=0, images=4000, steps=300)  # doctest: +SKIP
    >>> images = txt2img_per_class(pipe, per_class=10)  # doctest: +SKIP
    >>> per_class_recognition(judge, images, np.repeat(np.arange(10), 10))  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from realfake_ray.method.classifier import resnet_tiny, to_model_input
from realfake_ray.data.corpus import CLASS_NAMES
from realfake_ray.models.pretrain import render_corpus
from realfake_ray.method.prompts import GENERATION_SUFFIX, build_prompt
from realfake_ray.method.sampler import Sampler, SamplerSettings
from realfake_ray.seeds import derive_seed

__all__ = ["per_class_recognition", "train_corpus_judge", "txt2img_per_class"]


def train_corpus_judge(seed: int = 0, images: int = 6000, steps: int = 400, batch: int = 128,
                       start: int = 10_000_000) -> torch.nn.Module:
    """A small ResNet trained on corpus images ``start..start+images`` (far from any pretraining slice):
    the judge of which digit a generated image shows. Deterministic for a seed."""

    pixels, labels, _ = render_corpus(seed, start, start + images)
    torch.manual_seed(derive_seed(seed, "judge") % 2**63)
    model = resnet_tiny(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=steps)
    gen = torch.Generator().manual_seed(derive_seed(seed, "judge-batches") % 2**63)
    x_all, y_all = to_model_input(pixels), torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(x_all), (batch,), generator=gen)
        loss = F.cross_entropy(model(x_all[index]), y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def per_class_recognition(judge: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> list[float]:
    """Fraction of the uint8 NHWC ``images`` of each class that ``judge`` assigns to that class."""
    predictions = torch.cat([judge(to_model_input(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)])
    hits = predictions.numpy() == labels
    return [float(hits[labels == k].mean()) if (labels == k).any() else float("nan") for k in range(10)]


def txt2img_per_class(pipe, per_class: int = 10, steps: int = 20, guidance_scale: float = 2.0, seed: int = 0) -> np.ndarray:
    """``per_class`` txt2img samples of "photo of digit k, best quality" for k = 0..9, class-major, uint8 NHWC."""

    sampler = Sampler(pipe, SamplerSettings(mode="txt2img", steps=steps, guidance_scale=guidance_scale))
    prompts = [build_prompt(name, "", GENERATION_SUFFIX) for name in CLASS_NAMES for _ in range(per_class)]
    seeds = [derive_seed(seed, "txt2img", i) for i in range(len(prompts))]
    return np.concatenate([sampler(prompts=prompts[i : i + 100], seeds=seeds[i : i + 100])
                           for i in range(0, len(prompts), 100)])
