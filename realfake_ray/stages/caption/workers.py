"""What the caption stage's Ray tasks and actors run (no Ray here): the CPU decode, the captioner actor, the part
writer, and the final JSONL. ``driver.py`` wires them into one Ray Data pipeline.

Example:
    >>> clean_caption("  a dog\\n on grass ")
    'a dog on grass'
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realfake_ray import storage
from realfake_ray._internal.shards import part_files, write_part
from realfake_ray.config import RunConfig
from realfake_ray.data.imagefolder import open_rgb, squash_view
from realfake_ray.data.sources import fetch_images
from realfake_ray.devices import device_and_dtype
from realfake_ray.layout import RunLayout
from realfake_ray.models import loading
from realfake_ray.stages.caption.plan import PARTS

__all__ = [
    "CAPTION_COLUMNS", "MAX_LISTED", "decode_batch", "clean_caption", "Captioner", "write_caption_batch",
    "write_captions_jsonl",
]

CAPTION_COLUMNS = ("image_id", "caption", "error")  # error: "" or why the image could not be read
MAX_LISTED = 1000  # unreadable images listed in the summary (all are counted)


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """CPU task: each row's image (its ``bytes``, or read from its ``url`` — concurrently, with retries) squashed to
    ``size``² (``pixels``, uint8), as the BLIP-2 processor resizes it; an unreadable or undecodable image gets an
    ``error`` and a blank image. Keeps ``image_id``."""
    if "bytes" not in batch:
        batch = fetch_images(batch)
    n = len(batch["image_id"])
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors = np.array([e or "" for e in batch["error"]], dtype=object)
    for i, data in enumerate(batch["bytes"]):
        if errors[i]:
            continue
        try:
            pixels[i] = squash_view(open_rgb(data), size)
        except Exception as exc:  # a bad file is recorded, never fatal
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    return {"image_id": np.asarray(batch["image_id"], dtype=object), "pixels": pixels, "error": errors}


def clean_caption(text: str) -> str:
    """One line, single spaces: ``" a dog \\n on grass "`` → ``"a dog on grass"``."""
    return " ".join(text.split())


class Captioner:
    """Actor: the image-to-text model (``caption.model``, resolved like every model: hub id, local directory or
    fsspec URL), loaded once; captions a batch of decoded images as the reference does — the image alone, no text
    prompt, greedy decoding — with at most ``caption.max_tokens`` new tokens."""

    def __init__(self, cfg: RunConfig):
        c = cfg.caption
        model_dir = loading.resolve_model_dir(c.model, c.revision, cfg.model.hub_timeout_s, kind="transformers")
        self.device, self.dtype = device_and_dtype(c.dtype)
        self.model, self.processor = loading.load_captioner(model_dir, torch_dtype=self.dtype)
        self.model.to(self.device)
        self.max_tokens = c.max_tokens

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
