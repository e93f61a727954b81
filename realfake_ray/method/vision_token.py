"""Text-vision guidance: a CLIP image embedding overwrites the last token slot of the text states.

The reference code needed an unreleased diffusers fork (a ``vision_tokens`` pipeline argument).
Here the conditioning is built with stock modules and handed to diffusers as ``prompt_embeds``.
Pure torch; no Ray, no pydantic.

Example:
    >>> import torch
    >>> from realfake_ray.method.vision_token import inject_vision_token
    >>> hidden, token = torch.zeros(2, 77, 768), torch.ones(2, 768)
    >>> inject_vision_token(hidden, token)[:, -1].sum().item()
    1536.0
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_vision_token_width", "class_mean_tokens", "encode_text", "inject_vision_token"]


def check_vision_token_width(text_hidden_size: int, clip_projection_dim: int) -> None:
    """Fail early when the CLIP image embedding cannot stand in for a text token.

    Example:
        >>> check_vision_token_width(768, 768)  # SD v1.5 + openai/clip-vit-large-patch14
    """
    if text_hidden_size != clip_projection_dim:
        raise ValueError(
            f"CLIP image projection width {clip_projection_dim} != text encoder hidden size {text_hidden_size}; "
            "the guidance token must match the text width (768 for SD v1.5 with openai/clip-vit-large-patch14)"
        )


def inject_vision_token(hidden_states: Tensor, token: Tensor) -> Tensor:
    """Return a new tensor equal to ``hidden_states`` [B, L, D] with slot ``[:, -1, :]`` set to ``token``.

    ``token`` is [B, D], or [1, D] / [D] to use one token for the whole batch; it is cast to the
    hidden states' dtype and device. Autograd flows to both inputs; the input is not modified.

    Example:
        >>> out = inject_vision_token(torch.zeros(2, 4, 3), torch.ones(1, 3))
        >>> out[:, :-1].abs().sum().item(), out[:, -1].sum().item()
        (0.0, 6.0)
    """
    if hidden_states.ndim != 3:
        raise ValueError(f"hidden_states must be [batch, tokens, width]; got shape {tuple(hidden_states.shape)}")
    token = token.unsqueeze(0) if token.ndim == 1 else token
    if token.ndim != 2:
        raise ValueError(f"guidance token must be [batch, width]; got shape {tuple(token.shape)}")
    batch, _, width = hidden_states.shape
    if token.shape[1] != width:
        raise ValueError(f"guidance token width {token.shape[1]} != text hidden width {width}")
    if token.shape[0] not in (1, batch):
        raise ValueError(f"guidance token batch {token.shape[0]} != text batch {batch} (and is not 1)")
    token = token.to(device=hidden_states.device, dtype=hidden_states.dtype).expand(batch, width)
    return torch.cat([hidden_states[:, :-1], token.unsqueeze(1)], dim=1)


def _module_device(module: torch.nn.Module) -> torch.device:
    """Device of the module's first parameter (CPU for a parameterless module)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def encode_text(text_encoder: torch.nn.Module, input_ids: Tensor, guidance_token: Tensor | None = None) -> Tensor:
    """Encode token ids as SD does (``text_encoder(ids)[0]``, the last hidden state) and inject the token.

    Works with a stock transformers ``CLIPTextModel``; the result is a ``prompt_embeds`` tensor
    [B, L, D] for diffusers or the UNet's ``encoder_hidden_states``.

    Example:
        >>> from transformers import CLIPTextConfig, CLIPTextModel
        >>> enc = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
        ...                                    num_hidden_layers=1, vocab_size=99))
        >>> encode_text(enc, torch.zeros(2, 77, dtype=torch.long), torch.ones(2, 32)).shape
        torch.Size([2, 77, 32])
    """
    hidden = text_encoder(input_ids.to(_module_device(text_encoder)))[0]
    if guidance_token is None:
        return hidden
    return inject_vision_token(hidden, guidance_token)


def class_mean_tokens(embeds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean embedding per class, [num_classes, D] — the paper's intra-class guidance variant.

    Averages in float32 (embeddings are often stored in fp16) and returns ``embeds``' dtype.
    Raises ValueError naming the classes without samples or labels outside [0, num_classes).

    Example:
        >>> class_mean_tokens(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[2.],
                [5.]])
    """
    if embeds.ndim != 2 or labels.shape != embeds.shape[:1]:
        raise ValueError(f"need embeds [N, D] and labels [N]; got {tuple(embeds.shape)} and {tuple(labels.shape)}")
    labels = labels.to(embeds.device).long()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]")
    counts = torch.bincount(labels, minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"classes without any embedding: {empty[:20]}{' ...' if len(empty) > 20 else ''}")
    sums = torch.zeros(num_classes, embeds.shape[1], dtype=torch.float32, device=embeds.device)
    sums.index_add_(0, labels, embeds.float())
    return (sums / counts.unsqueeze(1)).to(embeds.dtype)
