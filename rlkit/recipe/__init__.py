"""The recipe layer: what a recipe is, before anything runs. The typed frozen dataclasses that hold every default
(rlkit.recipe.config), strict loading of YAML and overrides, the checks run at load, one record per stage kind
(rlkit.recipe.stage_kinds), the names of the recipe's switches (rlkit.recipe.names) and RecipeError.

Imports: the standard library, omegaconf and yaml only; no torch, and nothing else of rlkit, so that loading and
checking a recipe is fast and light. The public names are re-exported here (`from rlkit.recipe import RecipeConfig`).
"""

from rlkit.recipe.checks import NUMERIC_RANGES, validate
from rlkit.recipe.config import (AlgoConfig, CheckpointConfig, ClusterConfig, DataConfig, EnvConfig, EvalSetConfig,
                                 LoggingConfig, ModelConfig, RecipeConfig, RefConfig, RewardConfig, RewardSpec,
                                 RolloutConfig, StageConfig, TrainerConfig)
from rlkit.recipe.errors import RecipeError
from rlkit.recipe.load import load_recipe, to_yaml
from rlkit.recipe.names import looks_local
from rlkit.recipe.stage_kinds import stage_updates

__all__ = ["AlgoConfig", "CheckpointConfig", "ClusterConfig", "DataConfig", "EnvConfig", "EvalSetConfig",
           "LoggingConfig", "ModelConfig", "NUMERIC_RANGES", "RecipeConfig", "RecipeError", "RefConfig", "RewardConfig",
           "RewardSpec", "RolloutConfig", "StageConfig", "TrainerConfig", "load_recipe", "looks_local", "stage_updates",
           "to_yaml", "validate"]
