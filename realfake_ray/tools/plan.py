"""``realfake plan``: what a job will do and cost, before anything is spent — no GPU, no model weights, no network.

Per stage: the images it processes, the objects it writes and reads on the run's storage, the GPU-hours at the
per-GPU rates measured in BENCHMARKS.md (or ``--images-per-s stage=rate``), and the object-store request bill
at stated prices. ``--assume-images N`` plans without listing the dataset (offline, e.g. for ImageNet-1K:
1,281,167).

Example:
    $ realfake plan --config jobs/configs/in1k.yaml --mult 10 --assume-images 1281167
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from realfake_ray.config import ConfigError, RunConfig
from realfake_ray.data.captions import caption_stage_idle
from realfake_ray.data.labelled import real_set, real_train_set
from realfake_ray.plots import markdown_table
from realfake_ray.stages.generate.plan import images_per_shard, shards_of
from realfake_ray.stages.train.plan import epoch_repeats
from realfake_ray.tools.flops import SD15_FLOPS, TFLOP, img2img_flops

__all__ = ["MEASURED_RATES", "S3_PRICES", "StagePlan", "plan_job", "plan_markdown", "run_plan"]

# Per-GPU rates measured on one H200 (BENCHMARKS.md "GPU", 2026-11-30, SD v1.5 architecture): the sampler at the
# paper's settings (UniPC 30 steps, strength 0.75, CFG 2.0; bf16, batch 32, channels_last, compile) and the
# fine-tuning step (LoRA + MMD, bf16 base) at batch 8 and 32 per GPU. ResNet-50 training: the published
# 2.5-3 k images/s per A100 (AMP, channels_last), not measured here.
MEASURED_RATES = {
    "generate": {"per_gpu": 9.26, "unit": "images/s", "source": "H200, BENCHMARKS.md GPU"},
    "finetune_b8": {"per_gpu": 61.8, "unit": "samples/s", "source": "H200, BENCHMARKS.md GPU"},
    "finetune_b32": {"per_gpu": 105.0, "unit": "samples/s", "source": "H200, BENCHMARKS.md GPU"},
    "train": {"per_gpu": 2750.0, "unit": "images/s", "source": "A100, published ResNet-50 AMP figures"},
}
H200_BF16_PEAK = 989e12
ASSUMED_MFU = 0.4  # for the stages with no measured rate (encode, captioning): the FLOP model at this MFU
# Object storage list prices (S3 standard, us-east-1): per 1,000 requests.
S3_PRICES = {"put_list_per_1000": 0.005, "get_per_1000": 0.0004}
_CLIP_L14_FLOPS = 0.16 * TFLOP  # ViT-L/14 at 224² (~80 GFLOP forward, ×2 for multiply-add)
_BLIP2_FLOPS = 1.0 * TFLOP  # ViT-g + Q-Former + OPT-2.7b for ~30 tokens, per image (order of magnitude)


@dataclass
class StagePlan:
    stage: str
    images: int
    gpu_hours: float | None
    rate: str
    objects_written: int
    objects_read: int
    requests: int
    request_usd: float
    note: str = ""


def _usd(puts: int, gets: int) -> float:
    return round(puts / 1000 * S3_PRICES["put_list_per_1000"] + gets / 1000 * S3_PRICES["get_per_1000"], 2)


def _hours(work: float, rate: float) -> float:
    return round(work / rate / 3600, 1)


def _flop_rate(flops: float) -> float:
    return H200_BF16_PEAK * ASSUMED_MFU / flops


def _finetune_rate(batch: int) -> float:
    low, high = MEASURED_RATES["finetune_b8"]["per_gpu"], MEASURED_RATES["finetune_b32"]["per_gpu"]
    return low if batch <= 8 else high if batch >= 32 else low + (high - low) * (batch - 8) / 24


def _stage(stage, images, work, rate, written, read, lists, note="", unit="images/s") -> StagePlan:
    hours = _hours(work, rate) if rate else None
    label = f"{rate:,.2f} {unit}/GPU" if rate else "-"
    return StagePlan(stage, int(images), hours, label, int(written), int(read), int(written + read + lists),
                     _usd(int(written + lists), int(read)), note)


def plan_job(cfg: RunConfig, train_images: int, val_images: int = 0, rates: dict[str, float] | None = None,
             per_image_input: bool = True) -> list[StagePlan]:
    """The per-stage plan of ``cfg`` over ``train_images`` (+ ``val_images``) real images; ``rates`` overrides the
    per-GPU rate of a stage (images/s, samples/s for finetune); ``per_image_input``: one object per real image
    (ImageFolder) rather than shards."""
    rates = rates or {}
    e, f, g, t = cfg.encode, cfg.finetune, cfg.generate, cfg.train
    real = train_images + val_images
    plans = []
    if not caption_stage_idle(cfg):  # the caption stage: parts of caption.rows_per_file + JSONL, settings, summary
        rate = rates.get("caption") or _flop_rate(_BLIP2_FLOPS)
        plans.append(_stage("caption", train_images, train_images, rate,
                            math.ceil(train_images / cfg.caption.rows_per_file) + 3,
                            train_images if per_image_input else math.ceil(train_images / 1000), train_images / 1000,
                            "FLOP model" if "caption" not in rates else "given"))
    parts = math.ceil(train_images / e.rows_per_file) + math.ceil(val_images / e.rows_per_file)
    encode_flops = SD15_FLOPS.vae_encode * (e.resolution / 512) ** 2 * 2.33 + _CLIP_L14_FLOPS  # both views of 4:3
    plans.append(_stage("encode", real, real, rates.get("encode") or _flop_rate(encode_flops), parts + 2,
                        real if per_image_input else math.ceil(real / 1000), real / 1000 if per_image_input else 1,
                        "FLOP model (both views of a 4:3 image + CLIP)" if "encode" not in rates else "given"))
    samples = (f.max_steps * f.batch_size * f.num_workers) if f.max_steps else f.epochs * train_images
    steps = math.ceil(samples / (f.batch_size * f.num_workers))
    train_parts = math.ceil(train_images / e.rows_per_file)
    epochs = math.ceil(samples / max(train_images, 1))
    plans.append(_stage("finetune", samples, samples, rates.get("finetune") or _finetune_rate(f.batch_size),
                        3 * math.ceil(steps / f.checkpoint_every) + 4, epochs * train_parts, epochs,
                        f"{steps:,} steps of {f.batch_size} × {f.num_workers} GPUs", unit="samples/s"))
    synthetic = train_images * g.mult
    part_rows = min(e.rows_per_file, train_images)
    per_part = shards_of(part_rows, images_per_shard(g, e.resolution))
    shards, per_shard = per_part * train_parts * g.mult, math.ceil(part_rows / per_part)
    paper = img2img_flops(30, 0.75, cfg=True)
    this = img2img_flops(g.steps, g.strength if g.mode == "img2img" else 1.0, cfg=g.guidance_scale > 1.0)
    gen_rate = rates.get("generate") or MEASURED_RATES["generate"]["per_gpu"] * paper / this
    plans.append(_stage("generate", synthetic, synthetic, gen_rate, shards + 3, shards, math.ceil(shards / 1000),
                        f"{shards:,} shards of ~{per_shard} images"))
    source = t.source
    epoch_images = synthetic if source == "synthetic" else train_images if source == "real" else 2 * train_images
    repeats = epoch_repeats(t, epoch_images)  # passes over a small set per epoch
    epoch_images *= repeats
    budget_epochs = max(1, round(t.budget_images / epoch_images)) if t.budget_images else t.epochs
    seen = epoch_images * budget_epochs
    shard_reads = (1 if t.cache else budget_epochs * repeats) * (shards if source != "real" else 0)
    real_reads = budget_epochs * repeats * train_images if source != "synthetic" and per_image_input else 0
    plans.append(_stage("train", seen, seen, rates.get("train") or MEASURED_RATES["train"]["per_gpu"],
                        2 * budget_epochs + 4, shard_reads + real_reads, budget_epochs,
                        f"{budget_epochs} epochs of {epoch_images:,} images"))
    eval_images = val_images + min(synthetic, cfg.evaluate.distribution_max_images)
    plans.append(_stage("evaluate", eval_images, eval_images, 3 * (rates.get("train") or MEASURED_RATES["train"]["per_gpu"]),
                        3, val_images if per_image_input else math.ceil(val_images / 1000), 1))
    return plans


def plan_markdown(plans: list[StagePlan], cfg: RunConfig) -> str:
    rows = [asdict(p) for p in plans]
    total_h = sum(p.gpu_hours or 0 for p in plans)
    total_usd = sum(p.request_usd for p in plans)
    return (f"# Plan of the job at {cfg.out}\n\n" + markdown_table(rows) +
            f"\n\nTotal: {total_h:,.1f} GPU-hours (H200-class, rates above), "
            f"{sum(p.requests for p in plans):,} object-store requests ≈ ${total_usd:,.2f} at S3 list prices "
            f"(${S3_PRICES['put_list_per_1000']}/1k PUT/LIST, ${S3_PRICES['get_per_1000']}/1k GET).\n")


def _parse_rates(items: list[str] | None) -> dict[str, float]:
    rates = {}
    for item in items or []:
        stage, _, value = item.partition("=")
        try:
            rates[stage.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--images-per-s expects stage=rate (e.g. generate=12.5), got {item!r}") from None
    return rates


def run_plan(cfg: RunConfig, assume_images: int | None = None, assume_val_images: int | None = None,
             images_per_s: list[str] | None = None) -> dict:
    """Print the plan (a Markdown table) and return it; lists the dataset only without ``assume_images``."""
    if assume_images is None:
        data = cfg.require_data()
        train = real_train_set(cfg)
        val = real_set(data.val, cfg, train.class_dirs, data.val_labels).num_images if data.val else 0
        train_images, per_image = train.num_images, not train.sharded
    else:
        train_images, val, per_image = assume_images, assume_val_images or 0, True
    plans = plan_job(cfg, train_images, val, _parse_rates(images_per_s), per_image)
    print(plan_markdown(plans, cfg), flush=True)
    return {"train_images": train_images, "val_images": val, "stages": [asdict(p) for p in plans],
            "gpu_hours": round(sum(p.gpu_hours or 0 for p in plans), 1),
            "request_usd": round(sum(p.request_usd for p in plans), 2)}
