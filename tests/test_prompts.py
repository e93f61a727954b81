"""Tests for realfake_ray.method.prompts: prompt forms and tokenisation."""

from __future__ import annotations

import pytest
import torch

from realfake_ray.models.tiny import build_tiny_tokenizer
from realfake_ray.method.prompts import GENERATION_SUFFIX, NEGATIVE_PROMPT, build_prompt, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_constants() -> None:
    assert NEGATIVE_PROMPT == "distorted, unrealistic, blurry, out of frame, cropped, deformed"
    assert GENERATION_SUFFIX == ", best quality"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("tench", "a man holding a fish"), "photo of tench, a man holding a fish"),
        (("tench", "a man holding a fish", GENERATION_SUFFIX), "photo of tench, a man holding a fish, best quality"),
        (("tench",), "photo of tench"),
        (("tench", "   "), "photo of tench"),
        (("tench", "", GENERATION_SUFFIX), "photo of tench, best quality"),
        ((" golf ball ", " a ball on grass \n"), "photo of golf ball, a ball on grass"),
    ],
)
def test_build_prompt(args: tuple[str, ...], expected: str) -> None:
    assert build_prompt(*args) == expected


def test_build_prompt_rejects_empty_class() -> None:
    with pytest.raises(ValueError, match="class_name"):
        build_prompt("  ", "caption")


def test_tokenize_pads_and_truncates(tokenizer) -> None:
    long_prompt = build_prompt("one", " ".join(["seven eight nine"] * 40))
    ids = tokenize(tokenizer, ["photo of one", long_prompt])
    assert ids.dtype == torch.long and ids.shape == (2, tokenizer.model_max_length)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.pad_token_id
    assert ids[1, -1] == tokenizer.eos_token_id  # truncated, still closed


def test_tokenize_single_string_and_empty(tokenizer) -> None:
    assert tokenize(tokenizer, "photo of two").shape == (1, 77)
    with pytest.raises(ValueError, match="no prompts"):
        tokenize(tokenizer, [])
