"""LoRA adapters on the UNet's attention projections (pure torch/peft/diffusers; no Ray).

The adapter is a stock peft ``LoraConfig`` attached with ``unet.add_adapter``; the saved file is the
standard diffusers LoRA format (``pytorch_lora_weights.safetensors`` with ``unet.``-prefixed
``lora.down``/``lora.up`` keys and the adapter config as metadata), so a stock
``StableDiffusionPipeline.load_lora_weights(directory)`` loads it.

Example:
    >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
    >>> unet = build_random_tiny_pipeline().unet
    >>> params = add_lora(unet, rank=4)
    >>> all(p.requires_grad for p in params), len(params) > 0
    (True, True)
    >>> save_lora(unet, "/tmp/tiny-lora")  # doctest: +SKIP
    '/tmp/tiny-lora/pytorch_lora_weights.safetensors'
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_WEIGHT_NAME",
    "add_lora",
    "apply_lora",
    "check_lora_fits",
    "load_lora",
    "lora_parameters",
    "lora_digest",
    "lora_sha256",
    "lora_state_dict",
    "lora_weight_file",
    "save_lora",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "default"


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and attach a LoRA adapter to the modules named ``targets``; return its parameters.

    ``alpha`` None means alpha = rank (scale 1). ``lora_A`` is Gaussian-initialised from the current
    torch RNG (seed it first for reproducibility), ``lora_B`` is zero, so the adapter starts as a no-op.
    Only the returned LoRA parameters have ``requires_grad``; they are float32 whatever the base dtype.

    Example:
        >>> from realfake_ray.models.tiny import build_random_tiny_pipeline
        >>> unet = build_random_tiny_pipeline().unet
        >>> _ = add_lora(unet, rank=2, alpha=4.0, targets=["to_q", "to_v"])
        >>> sum(p.requires_grad for p in unet.parameters()) == len(lora_parameters(unet))
        True
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not targets:
        raise ValueError("LoRA targets: give at least one module name (e.g. to_q)")
    names = {name for name, _ in unet.named_modules()}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA targets {missing} match no module of the UNet (expected names like {list(DEFAULT_TARGETS)})")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )
    unet.add_adapter(config)
    params = lora_parameters(unet)
    for p in params:
        p.data = p.data.float()
    return params


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``unet``, in ``named_parameters`` order (stable across processes)."""
    return [p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad]


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights, detached, on CPU, in one key format: diffusers' (``...to_q.lora.down.weight``) when
    every key converts to it — attention-only adapters, the default — else PEFT's (``...lora_A.weight``) for all.
    diffusers converts only the attention projections, and its loader reads a file of mixed formats only in part
    (an adapter on attention + convolutions loaded without its attention factors)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    converted = convert_state_dict_to_diffusers(state)
    peft_keys = [k for k in converted if ".lora_A." in k or ".lora_B." in k]
    chosen = state if peft_keys and len(peft_keys) < len(converted) else converted
    return {k: v.detach().to("cpu").contiguous() for k, v in chosen.items()}


def save_lora(unet: torch.nn.Module, directory: str) -> str:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` (local path) atomically; return its path.

    The file is filled in a temporary directory beside ``directory`` and renamed into place, so a
    reader never sees a partial file. The adapter config (rank, alpha, targets) is stored as metadata.

    Example:
        >>> save_lora(unet, "/tmp/run/lora")  # doctest: +SKIP
        '/tmp/run/lora/pytorch_lora_weights.safetensors'
    """
    from diffusers import StableDiffusionPipeline

    if "://" in directory:
        raise ValueError(f"save_lora writes local paths only, got {directory!r}; upload with realfake_ray.storage")
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, LORA_WEIGHT_NAME)
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{uuid.uuid4().hex[:8]}-", dir=directory)
    try:
        metadata = unet.peft_config[ADAPTER_NAME].to_dict()
        StableDiffusionPipeline.save_lora_weights(
            save_directory=tmp_dir,
            unet_lora_layers=lora_state_dict(unet),
            safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )
        os.replace(os.path.join(tmp_dir, LORA_WEIGHT_NAME), target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def load_lora(unet: torch.nn.Module, directory: str) -> None:
    """Load weights written by :func:`save_lora` into ``unet``'s existing adapter (same rank/targets).

    Used to resume training; reads safetensors only. Raises ValueError on missing or unexpected keys.

    Example:
        >>> load_lora(unet, "/tmp/run/lora")  # doctest: +SKIP
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    raw = load_file(os.path.join(directory, LORA_WEIGHT_NAME))
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in raw.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{directory}: LoRA weights do not fit the adapter (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "rank or targets differ from the config"
        )


def lora_sha256(directory: str) -> str:
    """Content digest of ``<directory>/pytorch_lora_weights.safetensors`` (a local path): see :func:`lora_digest`.

    Example:
        >>> lora_sha256("/tmp/run/lora")  # doctest: +SKIP
        'e3b0c442...'
    """
    with open(os.path.join(directory, LORA_WEIGHT_NAME), "rb") as f:  # a few MB even for SD v1.5
        return lora_digest(f.read())


def lora_digest(data: bytes) -> str:
    """sha256 over a LoRA safetensors file's tensors (sorted by name: name, dtype, shape, bytes) and the
    adapter's rank, alpha and target modules.

    Not the file's own sha256: safetensors writes its metadata in hash-map order and peft keeps the target
    modules as a set, so the same adapter saved twice need not give the same bytes; this digest is the
    same exactly when the weights and the adapter config are.
    """
    import json
    import struct

    from safetensors.torch import load

    (header_len,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    config = {k.removeprefix("unet."): v for k, v in json.loads(metadata.get("lora_adapter_metadata") or "{}").items()}
    digest = hashlib.sha256()
    for name, tensor in sorted(load(data).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    identity = {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
                "target_modules": sorted(config.get("target_modules") or [])}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- LoRA files in a pipeline


def lora_weight_file(lora_dir: str) -> str:
    """The LoRA safetensors file: ``lora_dir`` itself, or the one (default-named) file inside it."""
    if os.path.isfile(lora_dir):
        return lora_dir
    if not os.path.isdir(lora_dir):
        raise FileNotFoundError(f"LoRA directory or file not found: {lora_dir}")
    default = os.path.join(lora_dir, LORA_WEIGHT_NAME)
    if os.path.isfile(default):
        return default
    found = sorted(f for f in os.listdir(lora_dir) if f.endswith(".safetensors"))
    if len(found) != 1:
        raise FileNotFoundError(f"no {LORA_WEIGHT_NAME} (nor exactly one *.safetensors) in {lora_dir}; found {found}")
    return os.path.join(lora_dir, found[0])


# (suffix, is_down): diffusers / peft / kohya-after-conversion spellings of the two LoRA factors.
_LORA_SUFFIXES = (
    (".lora_A.weight", True),
    (".lora.down.weight", True),
    (".lora_down.weight", True),
    (".lora_B.weight", False),
    (".lora.up.weight", False),
    (".lora_up.weight", False),
)


def _lora_target_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear / Conv2d that LoRA can wrap, else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def check_lora_fits(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, lora_file: str,
                    state_dict: dict[str, torch.Tensor] | None = None) -> int:
    """Raise ValueError naming ``lora_file`` and the first LoRA factor whose shape does not fit the model.

    Checks keys ``unet.<module>.lora_{A,B}.weight`` (and the ``lora.down/up`` spellings) against the
    Linear/Conv2d modules of ``unet`` and ``text_encoder`` (meta-device models built from their configs
    will do: only shapes are read). ``state_dict``: the file's, already read by diffusers' reader. Returns the
    number of factors checked.

    Example:
        >>> check_lora_fits(pipe.unet, pipe.text_encoder, "/runs/x/lora/pytorch_lora_weights.safetensors")  # doctest: +SKIP
        128
    """
    state_dict = _read_lora(lora_file) if state_dict is None else state_dict
    components = {"unet": unet, "text_encoder": text_encoder}
    checked = 0
    for key, tensor in state_dict.items():
        match = next(((key[: -len(s)], down) for s, down in _LORA_SUFFIXES if key.endswith(s)), None)
        if match is None:
            continue
        path, down = match
        prefix, _, sub = path.partition(".")
        root = components.get(prefix)
        if root is None:
            continue
        try:
            module = root.get_submodule(sub)
        except AttributeError:
            raise ValueError(f"LoRA file {lora_file}: key {key!r} names no module of the {prefix}") from None
        dims = _lora_target_dims(module)
        if dims is None:
            raise ValueError(f"LoRA file {lora_file}: key {key!r} targets a {type(module).__name__}, not Linear/Conv2d")
        want, got = (dims[0], tensor.shape[1]) if down else (dims[1], tensor.shape[0])
        if want != got:
            side = "input" if down else "output"
            raise ValueError(
                f"LoRA file {lora_file} does not fit this model: {key} has {side} width {got}, "
                f"but {prefix}.{sub} has {want} (shape {tuple(tensor.shape)}); was it trained on another base model?"
            )
        checked += 1
    if state_dict and not checked:
        example = next(iter(state_dict))
        raise ValueError(f"LoRA file {lora_file}: no key matches a UNet/text-encoder module (e.g. {example!r})")
    return checked


def apply_lora(pipe, lora_dir: str, lora_scale: float = 0.5) -> str:
    """Check, load and fuse a LoRA into ``pipe`` at ``lora_scale``, then drop the unfused adapters.

    Returns the weight file used. Raises ValueError (naming the file) when the LoRA does not fit.

    Example:
        >>> apply_lora(pipe, "/runs/x/lora", lora_scale=0.5)  # doctest: +SKIP
        '/runs/x/lora/pytorch_lora_weights.safetensors'
    """
    lora_file = lora_weight_file(lora_dir)
    state_dict = _read_lora(lora_file)
    check_lora_fits(pipe.unet, getattr(pipe, "text_encoder", None), lora_file, state_dict)
    try:
        pipe.load_lora_weights(os.path.dirname(lora_file) or ".", weight_name=os.path.basename(lora_file))
    except (RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[:2]
        raise ValueError(f"LoRA file {lora_file} could not be loaded into this model: {' '.join(first_line)}") from err
    _check_all_loaded(pipe, lora_file, state_dict)
    pipe.fuse_lora(lora_scale=lora_scale)
    pipe.unload_lora_weights()
    return lora_file


def _read_lora(lora_file: str) -> dict[str, torch.Tensor]:
    """The file's state dict through diffusers' reader (kohya and other spellings converted)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.lora_state_dict(lora_file)[0]


def _check_all_loaded(pipe, lora_file: str, state_dict: dict[str, torch.Tensor]) -> None:
    """ValueError naming the modules of ``lora_file`` (``state_dict``) that the loader left without their adapter."""
    named = {key[: -len(s)] for key in state_dict for s, _ in _LORA_SUFFIXES if key.endswith(s)}
    components = {"unet": pipe.unet, "text_encoder": getattr(pipe, "text_encoder", None)}
    missing = []
    for path in sorted(named):
        prefix, _, sub = path.partition(".")
        module = components.get(prefix).get_submodule(sub) if components.get(prefix) is not None else None
        if module is not None and not getattr(module, "lora_A", None):
            missing.append(path)
    if missing:
        raise ValueError(f"LoRA file {lora_file}: the loader attached no adapter to {len(missing)} of its "
                         f"{len(named)} modules ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
