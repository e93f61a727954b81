"""The caption stage's halves that need no Ray: what to caption (training images without a caption part row),
the CPU decode, the captioner actor, the part writer and the final JSONL. ``driver.py`` wires them into one
Ray Data pipeline.

Example:
    >>> from realfake_ray.config import load_config
    >>> skip_reason(load_config(preset="tiny"))  # the digits need no captions
    'caption.enabled is off'
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.shards import existing_keys, part_files, write_part
from realfake_ray.config import RunConfig
from realfake_ray.data.imagefolder import ImageFolderIndex, open_rgb, squash_view
from realfake_ray.devices import device_and_dtype
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading

__all__ = [
    "CAPTION_COLUMNS", "PARTS", "MAX_LISTED", "skip_reason", "caption_settings", "pending_rows", "decode_batch",
    "clean_caption", "Captioner", "write_caption_batch", "write_captions_jsonl",
]

CAPTION_COLUMNS = ("image_id", "caption", "error")  # error: "" or why the image could not be read
PARTS = "_parts"  # below <out>/captions
MAX_LISTED = 1000  # undecodable images listed in the summary (all are counted)


def skip_reason(cfg: RunConfig) -> str | None:
    """Why the stage has nothing to do for ``cfg`` (captions given, or captioning off), or None."""
    if cfg.data.captions_file:
        return f"data.captions_file is given ({cfg.data.captions_file})"
    if not cfg.caption.enabled:
        return "caption.enabled is off"
    return None


def caption_settings(cfg: RunConfig) -> dict:
    """What makes the captions (recorded in ``<out>/captions/_settings.json``: a rerun with others is refused)."""
    c = cfg.caption
    return {"model": c.model, "revision": c.revision, "max_tokens": c.max_tokens, "image_size": c.image_size}


def pending_rows(index: ImageFolderIndex, out: str) -> list[dict]:
    """``{"image_id", "url"}`` of every image of ``index`` without a part row yet (a captioned or an unreadable one)."""
    done = {key[0] for key in existing_keys(RunLayout(out).captions_dir(PARTS), ["image_id"])}
    return [{"image_id": r.image_id, "url": r.url} for r in index.records if r.image_id not in done]


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """CPU stage: each image squashed to ``size``² (``pixels``, uint8), as the BLIP-2 processor resizes it;
    an undecodable file gets an ``error`` and a blank image."""
    n = len(batch["url"])
    pixels, errors = np.zeros((n, size, size, 3), dtype=np.uint8), np.full(n, "", dtype=object)
    for i, url in enumerate(batch["url"]):
        try:
            pixels[i] = squash_view(open_rgb(storage.read_bytes(url)), size)
        except Exception as exc:  # a bad file is recorded, never fatal
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    return {**batch, "pixels": pixels, "error": errors}


def clean_caption(text: str) -> str:
    """One line, single spaces: ``" a dog \\n on grass "`` → ``"a dog on grass"``."""
    return " ".join(text.split())


class Captioner:
    """Actor: the image-to-text model (``caption.model``, resolved like every model: hub id, local directory or
    fsspec URL), loaded once; captions a batch of decoded images as the reference does — the image alone, no text
    prompt, greedy decoding — with at most ``caption.max_tokens`` new tokens."""

    def __init__(self, cfg: RunConfig):
        model_dir = loading.resolve_model_dir(cfg.caption.model, cfg.caption.revision, cfg.model.hub_timeout_s)
        self.device, self.dtype = device_and_dtype(cfg.caption.dtype)
        self.model, self.processor = loading.load_captioner(model_dir, torch_dtype=self.dtype)
        self.model.to(self.device)
        self.max_tokens = cfg.caption.max_tokens

    def caption(self, images: list[np.ndarray]) -> list[str]:
        """uint8 ``[H, W, 3]`` images → their captions."""
        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False)
        return [clean_caption(text) for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        readable = [i for i, error in enumerate(batch["error"]) if not error]
        captions = np.full(len(batch["image_id"]), "", dtype=object)
        for i, text in zip(readable, self.caption([batch["pixels"][i] for i in readable]) if readable else []):
            captions[i] = text
        return {"image_id": batch["image_id"], "caption": captions, "error": batch["error"]}


def write_caption_batch(batch: pa.Table, out: str) -> dict[str, np.ndarray]:
    """Writer task: the batch's rows as one part file (atomic) below ``<out>/captions/_parts``."""
    write_part(RunLayout(out).captions_dir(PARTS), batch.select(list(CAPTION_COLUMNS)))
    return {"rows": np.array([batch.num_rows])}


def write_captions_jsonl(out: str) -> dict:
    """Every part row of ``out`` with a caption → ``<out>/captions/captions.jsonl`` (one upload, atomic),
    streamed part by part; returns the counts and the first :data:`MAX_LISTED` unreadable images."""
    written, unreadable, listed = 0, 0, []
    with storage.written_from_local(RunLayout(out).captions_url()) as local, open(local, "w", encoding="utf-8") as fh:
        for url in part_files(RunLayout(out).captions_dir(PARTS)):
            with storage.open_file(url) as f:
                table = pq.read_table(f, columns=list(CAPTION_COLUMNS))
            for image_id, caption, error in zip(*(table.column(c).to_pylist() for c in CAPTION_COLUMNS)):
                if error:
                    unreadable += 1
                    listed += [{"image_id": image_id, "error": error}] if len(listed) < MAX_LISTED else []
                    continue
                fh.write(json.dumps({"image_id": image_id, "caption": caption}, ensure_ascii=False) + "\n")
                written += 1
    return {"captions": written, "unreadable": unreadable, "unreadable_files": listed}
