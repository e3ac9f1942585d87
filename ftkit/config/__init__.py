"""Stage configs: schemas (one per stage, built from shared sections) and the YAML loader."""

from ftkit.config.loading import (
    ConfigCheck,
    LoadedConfig,
    dump_resolved_config,
    load_stage_config,
    parse_overrides,
)
from ftkit.config.stages import (
    STAGE_SCHEMAS,
    EvaluateConfig,
    MergeConfig,
    QuantizeConfig,
    ServeConfig,
    TrainConfig,
)

__all__ = [
    "STAGE_SCHEMAS",
    "ConfigCheck",
    "EvaluateConfig",
    "LoadedConfig",
    "MergeConfig",
    "QuantizeConfig",
    "ServeConfig",
    "TrainConfig",
    "dump_resolved_config",
    "load_stage_config",
    "parse_overrides",
]
