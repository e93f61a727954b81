"""The config models: one pydantic section per stage, all held by :class:`RunConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from realfake_ray._internal.addresses import is_remote_address
from realfake_ray.data.class_lists import SHIPPED_CLASS_LISTS
from realfake_ray.storage import anchor

__all__ = [
    "Dtype", "PRESETS", "EMBEDDED_DATASET", "ConfigError", "ActorPool", "ModelConfig", "DataConfig", "CaptionConfig",
    "EncodeConfig", "FinetuneConfig", "GenerateConfig", "TRAIN_RECIPES", "TrainConfig", "EvaluateConfig", "PAPER_SAMPLER",
    "GENERATE_RECIPES",
    "TuneSamplerConfig", "AuditPrivacyConfig", "RayConfig", "TrackingConfig", "RunConfig",
]

Dtype = Literal["fp32", "fp16", "bf16"]
PRESETS = ("tiny",)
EMBEDDED_DATASET = "embedded:digits"  # train/, val/ and classes.json below it


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ActorPool(_Section):
    """Size of a Ray Data actor pool; ``max_size`` grows with an autoscaling cluster."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    gpus_per_actor: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> ActorPool:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        return self


class ModelConfig(_Section):
    """Where the Stable Diffusion pipeline and the CLIP vision model come from.

    ``pretrained``: a local diffusers directory, a Hugging Face repo id, an fsspec URL of a diffusers
    directory, or ``preset:tiny``. ``clip_vision`` is used only when the pipeline has no
    ``image_encoder`` component.
    """

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    clip_vision: str = "openai/clip-vit-large-patch14"
    revision: str | None = None
    hub_timeout_s: float = Field(10.0, gt=0)


class DataConfig(_Section):
    """The real dataset: URLs of labelled image sets in any layout of ``realfake_ray.data.sources`` (ImageFolder,
    class-index folders, a flat folder + labels file, Hugging Face Parquet, WebDataset) and optional side files."""

    train: str | None = None  # required; the tiny preset defaults to the embedded digits
    val: str | None = None
    train_labels: str | None = None  # labels file of a flat train folder (file,label CSV/TSV)
    val_labels: str | None = None  # labels file of a flat val folder: LOC_val_solution.csv or file,label CSV/TSV
    # JSON {folder: name}, lines "folder<TAB or space>name" (LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca"),
    # or a list shipped with the package: "imagenet1k" (one short name per ImageNet-1K synset)
    classes_file: str | None = None
    # a class name "a, b, c" (a synset's synonyms, from a classes file or Parquet ClassLabel names): its first
    # synonym in the prompts ("first"), or the whole list ("all")
    class_name_style: Literal["first", "all"] = "first"
    # JSONL {"image_id": ..., "caption": ...} for the training images; None: the caption stage's (see CaptionConfig)
    captions_file: str | None = None
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
    # The data-scarce regime: every stage sees only a seeded subset of this many train images per class (all of
    # a class's images when it has fewer; per-image layouts). None: the whole train set.
    train_per_class: int | None = Field(None, ge=1)


class CaptionConfig(_Section):
    """The caption stage: an image-to-text model (BLIP-2, as the reference) captions every training image once,
    into ``<out>/captions/captions.jsonl``, which encode reads. It does nothing when ``data.captions_file`` is
    given or ``enabled`` is off (then the prompts are "photo of {class}")."""

    enabled: bool = True
    model: str = "Salesforce/blip2-opt-2.7b"  # hub id, local transformers directory or fsspec URL of one
    revision: str | None = None  # of a hub id
    batch_size: int = Field(16, ge=1)
    max_tokens: int = Field(30, ge=1)  # new tokens per caption
    dtype: Dtype = "fp16"  # on GPU; CPU always computes in fp32
    image_size: int = Field(224, ge=8)  # CPU tasks squash each image to this square: BLIP-2's input (its processor's own resize)
    decode_cpus: float = Field(1.0, gt=0)
    rows_per_file: int = Field(4096, ge=1)  # captions per Parquet part (the unit a rerun resumes by)
    actors: ActorPool = ActorPool()


class EncodeConfig(_Section):
    resolution: int = Field(512, ge=8)
    batch_size: int = Field(32, ge=1)
    rows_per_file: int = Field(1024, ge=1)
    dtype: Dtype = "fp16"
    decode_cpus: float = Field(1.0, gt=0)
    actors: ActorPool = ActorPool()
    # The img2img start image: "squash" = the whole image resized to resolution² (the reference), "centre" =
    # short side to resolution + centre crop. Fine-tuning always takes random crops of the whole image.
    generation_view: Literal["squash", "centre"] = "squash"


class FinetuneConfig(_Section):
    """LoRA distribution-matching fine-tuning on the latent bank (Ray Train; see docs/finetune.md)."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs when the cluster has some now
    cpus_per_worker: float | Literal["auto"] = "auto"  # auto: 1, less on small CPU clusters (one CPU kept for data)
    batch_size: int = Field(8, ge=1)  # per worker
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float | None = Field(None, gt=0)  # None: alpha = rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    mmd_weight: float = Field(0.003, ge=0)
    mmd_kernel: Literal["linear", "gaussian"] = "linear"
    mmd_scope: Literal["local", "global"] = "local"  # local: each worker's own batch (the reference)
    snr_gamma: float | None = Field(5.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    # torch.compile the LoRA UNet's forward (and so its backward); the CUDA-graph modes only on GPU workers
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    hflip: bool = True
    vision_token: Literal["image", "class_mean", "none"] = "image"
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # newest checkpoints kept under <out>/finetune/finetune
    max_failures: int = Field(3, ge=-1)  # restarts after a lost worker, from the newest checkpoint (-1: unlimited)
    log_every: int = Field(10, ge=1)
    # global: a seeded permutation of the bank every epoch (the reference), the whole fine-tuning view through
    # Ray's object store each epoch; files: part files in a fresh seeded order + each worker's shuffle buffer;
    # auto: global up to global_shuffle_max_rows bank rows, files above (BENCHMARKS "Scale")
    shuffle: Literal["auto", "global", "files"] = "auto"
    global_shuffle_max_rows: int = Field(200_000, ge=0)
    shuffle_buffer_size: int = Field(1000, ge=0)  # shuffle=files only: rows per worker's local shuffle buffer

    @model_validator(mode="after")
    def _positive_cpus(self) -> FinetuneConfig:
        if self.cpus_per_worker != "auto" and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0 or 'auto' (got {self.cpus_per_worker})")
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"compile_mode={self.compile_mode!r} needs compile=true")
        return self


# The paper's sampler settings: what `realfake tune-sampler` judges every other setting against.
PAPER_SAMPLER: dict[str, Any] = {"scheduler": "unipc", "steps": 30, "strength": 0.75, "guidance_scale": 2.0,
                                 "lora_scale": 0.5, "speedup": "none"}

# Named sampler settings: the values a `generate.recipe` puts beneath the user's own `generate.*` keys.
GENERATE_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {**PAPER_SAMPLER, "negative_prompt": None},
    # The tiny preset's: the sampler `realfake tune-sampler --preset tiny` recommends (Euler, 8 steps, no CFG — so no
    # negative prompt —, DeepCache reusing the deep features every 3rd step) at strength 0.5; on three seeds of the
    # effectiveness benchmark it trains better classifiers than the paper's sampler and than itself at 0.75.
    "tiny-tuned": {**PAPER_SAMPLER, "scheduler": "euler", "steps": 8, "strength": 0.5, "guidance_scale": 1.0,
                   "speedup": "deepcache:3"},
}


class GenerateConfig(_Section):
    """Sampling the synthetic set. ``recipe`` names a bundle of sampler values (:data:`GENERATE_RECIPES`); keys
    given explicitly win over it. The field defaults are the ``paper`` recipe."""

    recipe: Literal["paper", "tiny-tuned"] = "paper"
    mult: int = Field(1, ge=1)
    mode: Literal["img2img", "txt2img"] = "img2img"
    strength: float = Field(0.75, gt=0, le=1)
    steps: int = Field(30, ge=1)
    scheduler: Literal["unipc", "dpmpp_2m_karras", "ddim", "euler"] = "unipc"
    guidance_scale: float = Field(2.0, ge=1)
    vision_token: Literal["image", "class_mean", "none"] = "image"
    allow_vision_token_mismatch: bool = False  # sample a LoRA with another vision token than it was fine-tuned with
    negative_vision_token: bool = False  # also put the guidance token into the negative (CFG) branch
    negative_prompt: str | None = None  # the CFG branch's prompt; None: the reference's, "": the empty prompt
    use_lora: bool = True
    lora_scale: float = Field(0.5, ge=0)
    sample_posterior: bool = True
    batch_size: int = Field(24, ge=1)
    dtype: Dtype = "fp16"
    channels_last: bool = True
    compile: bool = False
    # Speed options (docs/generate.md): off by default; on a CPU node the CUDA-only ones are dropped.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    sdpa_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"  # the UNet's attention kernel
    vae_dtype: Dtype | None = None  # the VAE decode's dtype; None: dtype
    fuse_qkv: bool = False  # one matmul for each attention layer's q/k/v projections
    speedup: str = "none"  # none | deepcache[:N] | tomesd[:ratio] (see realfake_ray.method.speedups)
    jpeg_quality: int = Field(75, ge=1, le=100)  # 75: PIL's default, what the reference stores
    storage_size: int | None = Field(None, ge=8)  # short side of stored JPEGs; None: the generation resolution
    # Output shards (the unit of atomic write and resume): ~shard_mb of JPEGs each, or exactly images_per_shard.
    shard_mb: float = Field(48.0, gt=0)
    images_per_shard: int | None = Field(None, ge=1)
    actors: ActorPool = ActorPool()

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("recipe", "paper") not in GENERATE_RECIPES:
            return data  # the Literal check names the allowed recipes
        return {**GENERATE_RECIPES[data.get("recipe", "paper")], **data}


# Named classifier recipes: the values a `train.recipe` puts beneath the user's own `train.*` keys.
_REFERENCE_RECIPE: dict[str, Any] = {
    # The paper's reference code (timm 0.9 train.py as its shell scripts call it): ResNet-50 from scratch.
    "arch": "resnet50", "image_size": 224, "epochs": 200, "base_lr": 0.1, "lr_reference_batch": 512,
    "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "decay_norm_and_bias": False,
    "schedule": "multistep", "milestones": (0.25, 0.5, 0.75), "gamma": 0.2, "warmup_epochs": 5.0,
    "warmup_lr": 1e-5, "label_smoothing": 0.1, "crop_scale": (0.08, 1.0), "interpolation": "random",
    "hflip": True, "color_jitter": 0.4, "eval_crop_pct": 0.95, "eval_interpolation": "bicubic",
    "amp": True, "amp_dtype": "fp16", "zero_init_residual": True, "budget_images": None,
}
TRAIN_RECIPES: dict[str, dict[str, Any]] = {
    "realfake-ref": _REFERENCE_RECIPE,
    # The protocol of every accuracy figure on the embedded 32-px digits (tiny preset, benchmarks): the
    # reference recipe scaled to 1,437 small, upright, not mirror-symmetric images (docs/train_evaluate.md).
    "digits-32px": {
        **_REFERENCE_RECIPE, "arch": "resnet_tiny", "image_size": 32, "epochs": 30, "base_lr": 0.8, "schedule": "cosine",
        "warmup_epochs": 2.0, "crop_scale": (0.6, 1.0), "hflip": False, "eval_crop_pct": 1.0,
        "budget_images": 30 * 1437,  # every classifier sees 30 epochs' worth of the 1,437 real train digits
    },
}


class TrainConfig(_Section):
    """The classifier and its recipe. ``recipe`` names a bundle of the values below (:data:`TRAIN_RECIPES`);
    keys given explicitly win over it. The field defaults are the ``realfake-ref`` recipe."""

    recipe: Literal["realfake-ref", "digits-32px"] = "realfake-ref"
    source: Literal["real", "synthetic", "mix"] = "synthetic"
    mix_ratio: float = Field(0.5, gt=0, lt=1)  # fraction of synthetic images in a "mix" epoch
    arch: str = "resnet50"
    image_size: int = Field(224, ge=8)
    epochs: int = Field(200, ge=1)
    # Same images seen whatever the set size: epochs (and warm-up) rescaled to ~budget_images / epoch images.
    # An explicit `epochs` turns a recipe's budget off.
    budget_images: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1)  # per worker
    base_lr: float = Field(0.1, gt=0)  # the lr at a global batch of lr_reference_batch (linear scaling)
    lr_reference_batch: int = Field(512, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    decay_norm_and_bias: bool = False  # weight decay on BatchNorm weights and biases too (off in the reference)
    schedule: Literal["cosine", "multistep"] = "multistep"
    milestones: tuple[float, ...] = (0.25, 0.5, 0.75)  # fractions of training, for multistep (50/100/150 of 200)
    gamma: float = Field(0.2, gt=0, le=1)
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_lr: float = Field(1e-5, ge=0)  # linear warm-up starts here
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    interpolation: Literal["bilinear", "bicubic", "random"] = "random"  # train crop resize (random: either)
    hflip: bool = True  # random horizontal flips (the tiny preset's digits are not mirror-symmetric: off)
    color_jitter: float = Field(0.4, ge=0)  # brightness/contrast/saturation factors in [1 - j, 1 + j]; 0: off
    eval_crop_pct: float = Field(0.95, gt=0, le=1)  # eval: short side to floor(S / crop_pct), centre crop S
    eval_interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    amp: bool = True
    amp_dtype: Literal["fp16", "bf16"] = "fp16"  # autocast dtype on GPU (fp16 adds a grad scaler)
    zero_init_residual: bool = True  # zero-init the last BatchNorm of each residual block (ResNets)
    # An exponential moving average of the weights (and BatchNorm statistics), updated every step and scored on val
    # beside the weights each epoch (val_top1_ema): a lower-variance reading for comparisons. None: off (the
    # reference has none). The saved model stays the trained weights.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    decode_cpus: float = Field(1.0, gt=0)
    worker_cpus: float = Field(1.0, gt=0)  # Ray CPUs held by each training worker (the rest decode images)
    # torch intra-op threads of each training worker; None: as many as it holds CPUs (Ray sets OMP_NUM_THREADS). More
    # than it holds lets a worker use cores the decode tasks leave idle between bursts (the tiny preset: 2 on 2 cores).
    torch_threads: int | None = Field(None, ge=1)
    synthetic: str | None = None  # another synthetic set (shards, Parquet, ImageFolder...); None: <out>/synthetic
    synthetic_mult: int | None = Field(None, ge=1)  # use copies with copy_idx < N (1x of a 10x set); None: all
    # Data order of a sharded set: "global" = a fresh permutation of every image each epoch (moves the images
    # through Ray's object store); "blocks" = shards in a fresh order each epoch + a per-worker shuffle buffer;
    # "auto" = global up to global_shuffle_max_images images, blocks above (per-image sets always shuffle globally:
    # their rows are URLs, cheap to shuffle).
    shuffle: Literal["auto", "global", "blocks"] = "auto"
    global_shuffle_max_images: int = Field(200_000, ge=0)
    shuffle_buffer_size: int = Field(10_000, ge=1)  # rows per worker's local shuffle buffer (shuffle=blocks)
    cache: bool = False  # keep each read shard / image file on the node's disk ($REALFAKE_CACHE) for later epochs
    max_read_errors: float = Field(0.001, ge=0, le=1)  # fraction of unreadable images that fails the stage
    checkpoint_keep: int = Field(2, ge=1)  # epoch checkpoints kept under <out>/classifier/<run name>/
    max_failures: int = Field(3, ge=-1)  # restarts after a lost worker, from the newest checkpoint (-1: unlimited)
    tag: str | None = None  # outputs in <out>/classifier/<tag>/ (several classifiers per run); None: <out>/classifier/
    real_baseline: bool = False  # `realfake run` also trains a real-only classifier (tag "real") to compare with

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("recipe", "realfake-ref")
        if name not in TRAIN_RECIPES:
            return data  # the Literal check names the allowed recipes
        recipe = dict(TRAIN_RECIPES[name])
        if "epochs" in data and "budget_images" not in data:
            recipe["budget_images"] = None  # epochs given explicitly: they are what the user asked for
        return {**recipe, **data}

    @model_validator(mode="after")
    def _crop_scale_range(self) -> TrainConfig:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1 (got {self.crop_scale})")
        return self


class EvaluateConfig(_Section):
    batch_size: int = Field(256, ge=1)
    extra_sets: dict[str, str] = {}  # name -> labelled ImageFolder URL (e.g. ImageNet-V2/Sketch/R/A)
    distribution_metrics: bool = True
    mmd_kernel: Literal["linear", "gaussian"] = "gaussian"
    nn_threshold: float = Field(0.05, ge=0)
    max_samples: int = Field(2000, ge=10)
    distribution_max_images: int = Field(20000, ge=10)  # synthetic images CLIP-embedded (seeded subset)
    actors: ActorPool = ActorPool()  # classifier / CLIP actors of the evaluation pipelines


class TuneSamplerConfig(_Section):
    """``realfake tune-sampler``: every combination of ``axes`` (generate keys), judged against ``reference``.

    Keys a grid does not sweep come from ``reference``, then from the ``generate`` section. Round 1 (every
    setting): images/s and KID / MMD² of ``proxy_rows`` generated images vs the real val set in CLIP space.
    Round 2 (the reference + up to ``finalists`` settings of the round-1 front): a classifier trained on
    ``accuracy_rows`` images generated with the setting, top-1 on the real val set."""

    axes: dict[str, list[Any]] = {  # 32 settings + the reference: ~9 min on 2 CPU cores with the tiny preset
        "scheduler": ["unipc", "dpmpp_2m_karras", "ddim", "euler"],
        "steps": [15, 8],
        "guidance_scale": [2.0, 1.0],
        "speedup": ["none", "deepcache:3"],
    }
    reference: dict[str, Any] = PAPER_SAMPLER
    proxy_rows: int = Field(512, ge=8)  # train-bank images generated per setting in round 1
    finalists: int = Field(3, ge=0)  # round-1 front settings given the classifier round, besides the reference
    accuracy_rows: int | None = Field(None, ge=8)  # train-bank images per finalist (None: the whole bank = 1x)
    classifier_budget_images: int = Field(21_555, ge=1)  # images the round-2 classifier sees (15 x 1,437)
    tolerance: float = Field(0.01, ge=0)  # accuracy a recommendation may lose against the reference (1 point)
    cpus_per_trial: float | None = Field(None, gt=0)  # None: a GPU trial takes 1 CPU, a CPU trial every CPU of a node
    gpus_per_trial: float | Literal["auto"] = "auto"  # auto: 1 when the cluster has GPUs, else 0


class AuditPrivacyConfig(_Section):
    """``realfake audit-privacy``: shadow-model membership inference against real- vs synthetic-trained
    classifiers, and how close synthetic images sit to their sources (docs/audit_privacy.md)."""

    shadows: int = Field(8, ge=4)  # shadow runs per arm (even: every image is in exactly half of them)
    arms: list[Literal["real", "synthetic"]] = ["real", "synthetic"]
    classifier_budget_images: int = Field(21_555, ge=1)  # images each shadow's quick classifier sees
    strengths: list[float] = [0.25, 0.5, 0.75, 1.0]  # generate.strength values of the generator-side study
    strength_rows: int = Field(256, ge=1)  # train-bank images generated per strength
    near_copy_threshold: float = Field(0.05, ge=0)  # CLIP cosine distance to its source below which = near-copy
    cpus_per_task: float = Field(1.0, gt=0)  # Ray CPUs per quick-classifier task


class RayConfig(_Section):
    address: str | None = None  # None: $RAY_ADDRESS, else a new local cluster on 127.0.0.1; "auto": a running one
    num_cpus: int | None = Field(None, ge=1)  # for a local cluster only
    verbose: bool = False  # Ray Data's per-operator progress bars and execution logs (--verbose)


class TrackingConfig(_Section):
    """Experiment tracking of the stages' metrics besides their JSONL/PNG files (realfake_ray._internal.tracking).
    Off by default. MLflow: one run per stage (``finetune``, ``train[-<tag>]``) nested under one run per
    ``--out``, holding the resolved config as parameters, the metric rows, the final evaluation and the PNGs."""

    # Any MLflow tracking URI (pip install 'realfake-ray[mlflow]'): an http(s) server, databricks, or a local
    # store given as an absolute file:/// URI (MLflow 3 keeps file stores in maintenance mode: realfake sets
    # MLFLOW_ALLOW_FILE_STORE=true for one unless the environment says otherwise). Ray workers log to it too:
    # on a cluster it must be reachable from every node. None: off.
    mlflow_uri: str | None = None
    mlflow_experiment: str = Field("realfake", min_length=1)
    tensorboard: bool = False  # event files below <out>/tensorboard/<stage>[/<tag>] (tensorboardX)


class RunConfig(_Section):
    """The whole run; each stage reads its own section plus the shared ones."""

    out: str = "runs/default"
    seed: int = 42
    preset: Literal["tiny"] | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    caption: CaptionConfig = CaptionConfig()
    encode: EncodeConfig = EncodeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    generate: GenerateConfig = GenerateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune_sampler: TuneSamplerConfig = TuneSamplerConfig()
    audit_privacy: AuditPrivacyConfig = AuditPrivacyConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _embedded_default(self) -> RunConfig:
        if self.preset == "tiny" and self.data.train is None:
            self.data = self.data.model_copy(update={
                "train": f"{EMBEDDED_DATASET}/train",
                "val": self.data.val or f"{EMBEDDED_DATASET}/val",
                "classes_file": self.data.classes_file or f"{EMBEDDED_DATASET}/classes.json",
            })
        return self

    @model_validator(mode="after")
    def _anchor_local_paths(self) -> RunConfig:
        """Relative local paths → absolute, once, where the config is made (the driver): Ray workers
        run in other directories. A model spec is anchored only when it is an existing local directory
        (``org/name`` is otherwise a Hugging Face id)."""
        import os

        def local_dir(spec: str) -> str:
            return anchor(spec) if "://" not in spec and os.path.isdir(os.path.expanduser(spec)) else spec

        self._refuse_relative_out_on_a_remote_cluster()
        _assign_changed(self, out=anchor(self.out))
        _assign_changed(self.model, pretrained=local_dir(self.model.pretrained), clip_vision=local_dir(self.model.clip_vision))
        _assign_changed(self.caption, model=local_dir(self.caption.model))
        shipped = self.data.classes_file in SHIPPED_CLASS_LISTS  # a name, not a path
        _assign_changed(self.data, **{k: anchor(v) for k in ("train", "val", "train_labels", "val_labels",
                                                              "classes_file", "captions_file")
                                      if (v := getattr(self.data, k)) and not (k == "classes_file" and shipped)})
        if self.train.synthetic:
            _assign_changed(self.train, synthetic=anchor(self.train.synthetic))
        if any(anchor(u) != u for u in self.evaluate.extra_sets.values()):
            _assign_changed(self.evaluate, extra_sets={k: anchor(u) for k, u in self.evaluate.extra_sets.items()})
        return self

    def _refuse_relative_out_on_a_remote_cluster(self) -> None:
        import os

        address = self.ray.address or os.environ.get("RAY_ADDRESS")
        relative = "://" not in self.out and not self.out.startswith(("/", "~", "embedded:"))
        if relative and is_remote_address(address):
            raise ConfigError(
                f"out={self.out!r} is a relative local path, but Ray runs on a remote cluster ({address}): its "
                "workers would write below their own working directories, on their own disks. Give --out a "
                "storage URL (s3://bucket/run, gs://...) or an absolute path on storage every node mounts"
            )

    def require_data(self) -> DataConfig:
        """The dataset section, or a clear error when no training images were given."""
        if not self.data.train:
            raise ConfigError("data.train: no dataset given; pass --data URL (an ImageFolder) or --preset tiny")
        return self.data


def _assign_changed(section: BaseModel, **values: Any) -> None:
    """Set only the values that differ (assignment re-validates the model, and so re-runs its validators)."""
    for key, value in values.items():
        if getattr(section, key) != value:
            setattr(section, key, value)
