"""Finding reward classes: built-ins by name (the one registry users extend), user classes by import path."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from rlkit.config import RecipeError, RewardSpec
from rewards.base import Reward

# name -> "module:Class"; imported on first use so a recipe pays only for the rewards it names
_BUILTINS: dict[str, str] = {
    "math": "rewards.math:MathReward",
    "honesty": "rewards.honesty:HonestyReward",
    "code": "rewards.code:CodeReward",
    "logic": "rewards.logic:LogicReward",
    "format": "rewards.format:FormatReward",
    "judge": "rewards.judge:JudgeReward",  # batched: run by the scorer over whole batches (rewards.scorer)
}


def register_reward(name: str, import_path: str) -> None:
    """Make `name` usable in recipes for the class at `import_path` ("pkg.module:Class")."""
    _BUILTINS[name] = import_path


def load_class(import_path: str, field: str) -> type:
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise RecipeError(f"{field}: '{import_path}' is not of the form 'pkg.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise RecipeError(f"{field}: cannot import module '{module_name}' ({type(e).__name__}: {e})") from e
    if not hasattr(module, attr):
        raise RecipeError(f"{field}: module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def instantiate(cls: type, kwargs: dict[str, Any], field: str, kwargs_field: str = "") -> Reward:
    """`cls(**kwargs)`. A ValueError from the constructor is its check of a kwarg's value (its message starts
    with the kwarg's name) and becomes a RecipeError under `kwargs_field`."""
    try:
        reward = cls(**kwargs)
    except TypeError as e:
        raise RecipeError(f"{field}: bad kwargs for {cls.__name__}: {e}") from e
    except ValueError as e:
        raise RecipeError(f"{kwargs_field or field}: {cls.__name__}: {e}") from e
    if not callable(getattr(reward, "score", None)) and not callable(getattr(reward, "score_batch", None)):
        raise RecipeError(f"{field}: {cls.__name__} has no score(sample) method")
    return reward


def builtin_reward(name: str, kwargs: dict[str, Any], field: str, kwargs_field: str = "") -> Reward:
    if name not in _BUILTINS:
        close = difflib.get_close_matches(name, list(_BUILTINS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Built-in rewards: {', '.join(sorted(_BUILTINS))}."
        raise RecipeError(f"{field}: unknown reward '{name}'.{hint} A custom class goes in import_path.")
    return instantiate(load_class(_BUILTINS[name], field), kwargs, field, kwargs_field)


def build_reward(spec: RewardSpec, index: int) -> Reward:
    """The reward a recipe entry names, failing with the entry's field path on any problem."""
    field = f"reward.rewards[{index}]"
    kwargs = dict(spec.kwargs)
    if spec.import_path:
        return instantiate(load_class(spec.import_path, f"{field}.import_path"), kwargs, f"{field}.import_path",
                           f"{field}.kwargs")
    return builtin_reward(spec.name, kwargs, f"{field}.name", f"{field}.kwargs")


def resolve_spec(spec: RewardSpec) -> RewardSpec:
    """The spec with a built-in name turned into its import path, so spawned workers (which do not see
    `register_reward` calls made in this process) build the same class."""
    if spec.import_path or spec.name not in _BUILTINS:
        return spec
    return dataclasses.replace(spec, import_path=_BUILTINS[spec.name])


def reward_label(spec: RewardSpec) -> str:
    """The name a reward's component is logged under."""
    return spec.name or spec.import_path.rpartition(":")[2]
