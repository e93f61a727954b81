"""Where every output of a run lives below its ``--out`` URL: the one place that spells those paths.

Stages, the report and the benchmarks ask a :class:`RunLayout` instead of joining folder names
themselves, so no stage imports another stage for a path.

Example:
    >>> layout = RunLayout("s3://bucket/run")
    >>> layout.bank_dir("train")
    's3://bucket/run/latents/train'
    >>> layout.manifest_dir()
    's3://bucket/run/synthetic/_manifest'
    >>> layout.classifier_dir("real")
    's3://bucket/run/classifier/real'
"""

from __future__ import annotations

from dataclasses import dataclass

from realfake_ray import storage

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run; ``out`` is a local path or any fsspec URL."""

    out: str

    def _at(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    # the whole run
    def lease_url(self) -> str:
        """``<out>/_lease.json``: which job works on this run now (owner and heartbeat, see
        ``realfake_ray._internal.lease``); present only while a job runs."""
        return self._at("_lease.json")

    # encode
    def bank_dir(self, split: str | None = None) -> str:
        """``<out>/latents`` (the latent bank), or one split's Parquet parts below it."""
        return self._at("latents", split) if split else self._at("latents")

    def skipped_dir(self, split: str) -> str:
        """``<out>/latents/_skipped/<split>``: the images encode could not read, one row each."""
        return self._at("latents", "_skipped", split)

    def meta_url(self) -> str:
        """``<out>/latents/_meta.json``: classes, splits, row counts and the models that made the bank."""
        return self._at("latents", "_meta.json")

    # finetune
    def finetune_dir(self) -> str:
        """``<out>/finetune``: config, metrics, plot, ``_done.json`` and the Ray Train checkpoints."""
        return self._at("finetune")

    def lora_dir(self) -> str:
        """``<out>/lora``: the final ``pytorch_lora_weights.safetensors``."""
        return self._at("lora")

    # generate
    def synthetic_dir(self, *parts: str) -> str:
        """``<out>/synthetic`` or a path below it."""
        return self._at("synthetic", *parts)

    def images_dir(self) -> str:
        """``<out>/synthetic/train``: the synthetic ImageFolder (``<class>/<stem>__c<copy>.jpg``)."""
        return self.synthetic_dir("train")

    def manifest_dir(self) -> str:
        """``<out>/synthetic/_manifest``: Parquet parts, one row per written image."""
        return self.synthetic_dir("_manifest")

    # train / evaluate
    def classifier_dir(self, tag: str | None = None) -> str:
        """``<out>/classifier[/<tag>]``: checkpoints, metrics, curves, final weights and reports."""
        return self._at("classifier", tag) if tag else self._at("classifier")

    # the run's report and the tools on top of a run
    def report_url(self, suffix: str = "json") -> str:
        """``<out>/report.json`` / ``report.md``."""
        return self._at(f"report.{suffix}")

    def file(self, name: str) -> str:
        """A file the report writes at the top of the run (``_stages.json``, its PNGs)."""
        return self._at(name)

    def audit_dir(self, *parts: str) -> str:
        """``<out>/audit_privacy[/parts...]``: the privacy audit's shadow runs and results."""
        return self._at("audit_privacy", *parts)

    def tune_dir(self, *parts: str) -> str:
        """``<out>/tune_sampler[/parts...]``: the sampler-tuning trials and results."""
        return self._at("tune_sampler", *parts)
