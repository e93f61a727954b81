"""Typed configuration: one pydantic model per stage, all sections of :class:`RunConfig`.

Values are resolved in this order (later wins): field defaults < ``--preset`` < ``--config FILE``
(YAML) < command-line flags < ``--set section.key=value`` overrides. Everything is validated here,
before any Ray work starts; an error names the field, the value given and what is allowed.
The models live in ``config.sections``, the resolution in ``config.loading``.

Example:
    >>> cfg = load_config(preset="tiny", out="/tmp/run", overrides=["encode.batch_size=16"])
    >>> cfg.encode.batch_size, cfg.model.pretrained
    (16, 'preset:tiny')
"""

from realfake_ray.config.loading import (
    build_config,
    deep_merge,
    dump_config,
    load_config,
    parse_override,
    read_yaml_config,
)
from realfake_ray.config.sections import (
    EMBEDDED_DATASET,
    GENERATE_RECIPES,
    PAPER_SAMPLER,
    PRESETS,
    TRAIN_RECIPES,
    ActorPool,
    AuditPrivacyConfig,
    CaptionConfig,
    ConfigError,
    DataConfig,
    Dtype,
    EncodeConfig,
    EvaluateConfig,
    FinetuneConfig,
    GenerateConfig,
    ModelConfig,
    RayConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
    TuneSamplerConfig,
)

__all__ = [
    "Dtype", "PRESETS", "EMBEDDED_DATASET", "ConfigError", "ActorPool", "ModelConfig", "DataConfig", "CaptionConfig",
    "EncodeConfig", "FinetuneConfig", "GenerateConfig", "TRAIN_RECIPES", "TrainConfig", "EvaluateConfig",
    "PAPER_SAMPLER", "GENERATE_RECIPES", "TuneSamplerConfig", "AuditPrivacyConfig", "RayConfig", "TrackingConfig",
    "RunConfig", "deep_merge", "parse_override", "read_yaml_config", "build_config", "load_config", "dump_config",
]
