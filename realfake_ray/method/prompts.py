"""Prompt text and tokenisation for fine-tuning and generation (no Ray, no pydantic).

Training prompts are "photo of {class}, {caption}"; generation appends :data:`GENERATION_SUFFIX` and
uses :data:`NEGATIVE_PROMPT` for classifier-free guidance.

Example:
    >>> build_prompt("tench", "a man holding a fish", GENERATION_SUFFIX)
    'photo of tench, a man holding a fish, best quality'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["GENERATION_SUFFIX", "NEGATIVE_PROMPT", "build_prompt", "tokenize"]

NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame, cropped, deformed"
GENERATION_SUFFIX = ", best quality"


def build_prompt(class_name: str, caption: str = "", suffix: str = "") -> str:
    """``"photo of {class_name}, {caption}{suffix}"``; the caption and its comma drop out when blank.

    Class name and caption are stripped of surrounding whitespace, as is the result.

    Example:
        >>> build_prompt("golf ball", "  ")
        'photo of golf ball'
        >>> build_prompt("golf ball", suffix=", best quality")
        'photo of golf ball, best quality'
    """
    class_name, caption = class_name.strip(), caption.strip()
    if not class_name:
        raise ValueError("build_prompt: class_name is empty")
    body = f"photo of {class_name}, {caption}" if caption else f"photo of {class_name}"
    return f"{body}{suffix}".strip()


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.LongTensor:
    """Token ids [B, tokenizer.model_max_length], padded to that length and truncated, as SD expects.

    A single string is treated as a batch of one.

    Example:
        >>> from realfake_ray.models.tiny import build_tiny_tokenizer
        >>> tokenize(build_tiny_tokenizer(), ["photo of one", "photo of two"]).shape
        torch.Size([2, 77])
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("tokenize: no prompts given")
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
