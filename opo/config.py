"""Building a config: the schema's checks, then each registry's check of the names it owns.

``opo.schema`` holds the typed dataclasses, YAML, overrides and the type and range checks;
it imports nothing from opo, so every module can depend on it. A name that only a
registry knows (an estimator, a reward kind, a data source or task, a logger) is checked
where that registry lives, by its ``check_config``. This module sits above both and is
the one place that runs them all, so a config built here has been checked completely
before any model loads. Everything else of the schema is re-exported for convenience.
"""

from __future__ import annotations

from pathlib import Path

from opo.schema import (AlgoConfig, CheckpointConfig, Config, ConfigError, DataConfig, EvalConfig, LoraConfig,
                        MetricsConfig, ModelConfig, OptimConfig, PromptConfig, RewardConfig, RolloutConfig,
                        RunConfig, TrainerConfig, VLLMConfig, allowed_values, check_values, dump_yaml,
                        field_docs, list_presets, merge_overrides, parse_config, parse_dict, read_yaml,
                        to_dict)


def check_names(cfg: Config) -> None:
    """Every registry checks its own section; the first problem is a ConfigError."""
    # Imported here so that `import opo.config` (the CLI's start, `opo config`) loads
    # neither torch nor the data and reward packages; none of them imports this module.
    from opo import advantages, data, loggers
    from opo.rewards import check as rewards

    for check in (advantages.check_config, loggers.check_config, rewards.check_config,
                  data.check_config):
        check(cfg)


def load_config(source: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then a preset name or YAML path, then dotted overrides; fully checked."""
    cfg = parse_config(source, overrides)
    check_names(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply dotted `key=value` overrides in place, then check everything again."""
    merge_overrides(cfg, overrides)
    check_names(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """A Config from a nested dict (a run's config.yaml), fully checked."""
    cfg = parse_dict(data)
    check_names(cfg)
    return cfg


__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "from_dict", "to_dict", "dump_yaml",
           "field_docs", "allowed_values", "list_presets", "check_names", "check_values", "read_yaml",
           "AlgoConfig", "CheckpointConfig", "DataConfig", "EvalConfig", "LoraConfig", "MetricsConfig",
           "ModelConfig", "OptimConfig", "PromptConfig", "RewardConfig", "RolloutConfig", "RunConfig",
           "TrainerConfig", "VLLMConfig"]
