"""Where every output of a run lives below its ``--out`` URL: the one place that spells those paths.

Stages, the report and the benchmarks ask a :class:`RunLayout` instead of joining folder names
themselves, so no stage imports another stage for a path. Each command's folders are named once, in its
:mod:`~realfake_ray.stages.registry` entry (``outputs``); this class spells the paths below them.

Example:
    >>> layout = RunLayout("s3://bucket/run")
    >>> layout.captions_url()
    's3://bucket/run/captions/captions.jsonl'
    >>> layout.bank_dir("train")
    's3://bucket/run/latents/train'
    >>> layout.shards_dir()
    's3://bucket/run/synthetic/data'
    >>> layout.classifier_dir("real")
    's3://bucket/run/classifier/real'
    >>> layout.outputs("finetune")
    ['s3://bucket/run/finetune', 's3://bucket/run/lora']
"""

from __future__ import annotations

from dataclasses import dataclass

from realfake_ray import storage
from realfake_ray.stages.registry import COMMANDS

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run; ``out`` is a local path or any fsspec URL."""

    out: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    def _of(self, command: str, *parts: str, output: int = 0) -> str:
        """A path below the ``output``-th folder of ``command`` (its registry entry names the folders)."""
        return self._at(COMMANDS[command].outputs[output], *parts)

    def outputs(self, command: str) -> list[str]:
        """Every folder ``command`` (a stage or a tool) writes below ``out``."""
        return [self._at(folder) for folder in COMMANDS[command].outputs]

    # the whole run
    def lease_url(self) -> str:
        """``<out>/_lease.json``: which job works on this run now (owner and heartbeat, see
        ``realfake_ray._internal.lease``); present only while a job runs."""
        return self._at("_lease.json")

    # caption
    def captions_dir(self, *parts: str) -> str:
        """``<out>/captions`` or a path below it (``_parts/``: Parquet parts of (image_id, caption, error);
        ``_settings.json``, ``_summary.json``)."""
        return self._of("caption", *parts)

    def captions_url(self) -> str:
        """``<out>/captions/captions.jsonl``: one ``{"image_id", "caption"}`` per training image, what encode
        reads (the format of ``data.captions_file``)."""
        return self.captions_dir("captions.jsonl")

    # encode
    def bank_dir(self, split: str | None = None) -> str:
        """``<out>/latents`` (the latent bank), or one split's Parquet parts below it."""
        return self._of("encode", *([split] if split else []))

    def skipped_dir(self, split: str) -> str:
        """``<out>/latents/_skipped/<split>``: the images encode could not read, one row each."""
        return self._of("encode", "_skipped", split)

    def meta_url(self) -> str:
        """``<out>/latents/_meta.json``: classes, splits, row counts and the models that made the bank."""
        return self._of("encode", "_meta.json")

    # finetune
    def finetune_dir(self) -> str:
        """``<out>/finetune``: config, metrics, plot, ``_done.json`` and the Ray Train checkpoints."""
        return self._of("finetune")

    def lora_dir(self) -> str:
        """``<out>/lora``: the final ``pytorch_lora_weights.safetensors``."""
        return self._of("finetune", output=1)

    # generate
    def synthetic_dir(self, *parts: str) -> str:
        """``<out>/synthetic`` or a path below it."""
        return self._of("generate", *parts)

    def shards_dir(self) -> str:
        """``<out>/synthetic/data``: the synthetic set's Parquet shards (``realfake_ray.data.synthetic``)."""
        return self.synthetic_dir("data")

    # train / evaluate
    def classifier_dir(self, tag: str | None = None) -> str:
        """``<out>/classifier[/<tag>]``: checkpoints, metrics, curves, final weights and reports."""
        return self._of("train", *([tag] if tag else []))

    def distribution_url(self) -> str:
        """``<out>/classifier/distribution.json``: the synthetic-vs-real CLIP metrics, which depend on the
        synthetic set and the bank, not on a classifier: computed once, shared by every tag's evaluation."""
        return self._of("train", "distribution.json")

    # the run's report and the tools on top of a run
    def report_url(self, suffix: str = "json") -> str:
        """``<out>/report.json`` / ``report.md``."""
        return self._at(f"report.{suffix}")

    def file(self, name: str) -> str:
        """A file the report writes at the top of the run (``_stages.json``, its PNGs)."""
        return self._at(name)

    def tensorboard_dir(self, stage: str, tag: str | None = None) -> str:
        """``<out>/tensorboard/<stage>[/<tag>]``: a stage's TensorBoard event files (``tracking.tensorboard``)."""
        return self._at("tensorboard", stage, *([tag] if tag else []))

    def filtered_dir(self, *parts: str) -> str:
        """``<out>/synthetic_filtered[/parts...]``: label-agreement filtered synthetic sets, one per classifier."""
        return self._of("filter-synthetic", *parts)

    def audit_dir(self, *parts: str) -> str:
        """``<out>/audit_privacy[/parts...]``: the privacy audit's shadow runs and results."""
        return self._of("audit-privacy", *parts)

    def bench_dir(self, *parts: str) -> str:
        """``<out>/bench[/parts...]``: the sampler benchmark's table."""
        return self._of("bench-sampler", *parts)

    def tune_dir(self, *parts: str) -> str:
        """``<out>/tune_sampler[/parts...]``: the sampler-tuning trials and results."""
        return self._of("tune-sampler", *parts)
