"""Where torch runs inside a stage's Ray actors and workers: one policy for every stage.

Example:
    >>> torch_device().type in ("cpu", "cuda")
    True
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["COMPILE_MODES", "torch_device", "device_and_dtype", "records_cuda_graphs", "compile_mode_on"]

log = logging.getLogger(__name__)

_warned = False
# torch.compile's modes; two of them also record CUDA graphs, which exist only on CUDA
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_WITHOUT_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def torch_device() -> torch.device:
    """``cuda`` when torch sees a GPU, else ``cpu``.

    Ray assigning a GPU to an actor (``num_gpus=1`` sets ``CUDA_VISIBLE_DEVICES``) does not make one usable:
    the fake nodes of an autoscaling test cluster only *advertise* ``{"GPU": 1}``, and a node's CUDA driver
    can be broken. Such an actor runs on CPU and says so once, instead of failing on its first CUDA call.
    """
    global _warned
    if torch.cuda.is_available():
        return torch.device("cuda")
    assigned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if assigned and not _warned:
        _warned = True
        log.warning(f"Ray assigned GPU {assigned} to this process but torch sees no CUDA device: running on CPU")
    return torch.device("cpu")


def device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    """:func:`torch_device`, and the wanted dtype (``fp32``/``fp16``/``bf16``) there; fp32 on CPU (fp16 CPU
    convolutions are slow or missing)."""
    device = torch_device()
    wanted = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return device, wanted if device.type == "cuda" else torch.float32


def records_cuda_graphs(mode: str) -> bool:
    """Whether ``torch.compile(mode=mode)`` records CUDA graphs (``reduce-overhead``, ``max-autotune``)."""
    return mode in _WITHOUT_GRAPHS


def compile_mode_on(device_type: str, mode: str) -> str:
    """The ``torch.compile`` mode as it runs on ``device_type``: elsewhere than CUDA the modes that record CUDA
    graphs become their equivalents without them.

    Example:
        >>> compile_mode_on("cpu", "reduce-overhead"), compile_mode_on("cuda", "reduce-overhead")
        ('default', 'reduce-overhead')
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is unknown; valid: {list(COMPILE_MODES)}")
    return mode if device_type == "cuda" else _WITHOUT_GRAPHS.get(mode, mode)
