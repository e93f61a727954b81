"""Tests for realfake_ray.method.vision_token: last-slot injection, text encoding, intra-class mean tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from realfake_ray.method.vision_token import check_vision_token_width, class_mean_tokens, encode_text, inject_vision_token

WIDTH = 32


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=100,
        max_position_embeddings=16,
    )
    return CLIPTextModel(config).eval()


def test_inject_replaces_only_last_slot() -> None:
    hidden = torch.randn(2, 5, 4)
    original = hidden.clone()
    token = torch.randn(2, 4, dtype=torch.float64)
    out = inject_vision_token(hidden, token)
    assert out.dtype == hidden.dtype and out.shape == hidden.shape
    assert torch.equal(out[:, :-1], original[:, :-1])
    assert torch.equal(out[:, -1], token.float())
    assert torch.equal(hidden, original)  # input untouched


def test_inject_broadcasts_single_token_and_keeps_grad() -> None:
    hidden = torch.zeros(3, 4, 2, requires_grad=True)
    token = torch.ones(1, 2, requires_grad=True)
    out = inject_vision_token(hidden, token)
    assert torch.equal(out[:, -1], torch.ones(3, 2))
    out.sum().backward()
    assert token.grad.tolist() == [[3.0, 3.0]]
    assert hidden.grad[:, -1].abs().sum() == 0 and hidden.grad[:, :-1].eq(1).all()


def test_inject_errors() -> None:
    with pytest.raises(ValueError, match="width 8 != text hidden width 4"):
        inject_vision_token(torch.zeros(2, 5, 4), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="batch 3 != text batch 2"):
        inject_vision_token(torch.zeros(2, 5, 4), torch.zeros(3, 4))


def test_encode_text_on_stock_clip(text_encoder: CLIPTextModel) -> None:
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    token = torch.randn(2, WIDTH).half()
    with torch.no_grad():
        plain = encode_text(text_encoder, ids)
        guided = encode_text(text_encoder, ids, token)
        reference = text_encoder(ids).last_hidden_state
    assert torch.equal(plain, reference)
    assert torch.equal(guided[:, :-1], reference[:, :-1])
    assert torch.equal(guided[:, -1], token.float())


def test_check_vision_token_width() -> None:
    check_vision_token_width(768, 768)
    with pytest.raises(ValueError, match=r"projection width 1024 != text encoder hidden size 768.*768 for SD v1.5"):
        check_vision_token_width(768, 1024)


def test_class_mean_tokens() -> None:
    embeds = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 1.0]]).half()
    means = class_mean_tokens(embeds, torch.tensor([0, 0, 2, 1]), 3)
    assert means.dtype == torch.float16
    assert means.tolist() == [[2.0, 1.0], [0.0, 1.0], [5.0, 5.0]]


def test_class_mean_tokens_errors() -> None:
    with pytest.raises(ValueError, match=r"without any embedding: \[1, 3\]"):
        class_mean_tokens(torch.zeros(2, 2), torch.tensor([0, 2]), 4)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        class_mean_tokens(torch.zeros(2, 2), torch.tensor([0, 2]), 2)
