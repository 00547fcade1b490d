"""Finding reward classes: built-ins by name (the one registry users extend), user classes by import path.

A reward is named by a `RewardSpec`; rlkit turns each entry of its recipe's `reward.rewards` into one
(rlkit.runtime.scoring.scorer_config). A spec that cannot work raises `RewardConfigError` naming the recipe field
(`reward.rewards[0].name: unknown reward 'mth'. Did you mean 'math'?`), which rlkit reports as its RecipeError.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Mapping

from rlkit.rewards.base import Reward


class RewardConfigError(ValueError):
    """A reward spec or scorer setting that cannot work; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward: a built-in `name` or a user class at `import_path`, its weight in the sum, its constructor kwargs."""

    name: str = ""  # built-in (see _BUILTINS), or the logged label of an `import_path` class
    import_path: str = ""  # "pkg.module:Class"
    weight: float = 1.0
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # passed to the reward's constructor


# name -> "module:Class"; imported on first use so a recipe pays only for the rewards it names
_BUILTINS: dict[str, str] = {
    "math": "rlkit.rewards.math:MathReward",
    "honesty": "rlkit.rewards.honesty:HonestyReward",
    "code": "rlkit.rewards.code:CodeReward",
    "logic": "rlkit.rewards.logic:LogicReward",
    "format": "rlkit.rewards.format:FormatReward",
    "judge": "rlkit.rewards.judge:JudgeReward",  # batched: run by the scorer over whole batches (rlkit.rewards.scorer)
    "model": "rlkit.rewards.model:ModelReward",  # batched too: a trained reward model (rlkit.rewards.model)
}


def register_reward(name: str, import_path: str) -> None:
    """Make `name` usable in recipes for the class at `import_path` ("pkg.module:Class")."""
    _BUILTINS[name] = import_path


def load_class(import_path: str, field: str) -> type:
    module_name, _, attr = import_path.partition(":")
    if not module_name or not attr:
        raise RewardConfigError(f"{field}: '{import_path}' is not of the form 'pkg.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing the user's module
        raise RewardConfigError(f"{field}: cannot import module '{module_name}' ({type(e).__name__}: {e})") from e
    if not hasattr(module, attr):
        raise RewardConfigError(f"{field}: module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def instantiate(cls: type, kwargs: dict[str, Any], field: str, kwargs_field: str = "") -> Reward:
    """`cls(**kwargs)`. A ValueError from the constructor is its check of a kwarg's value (its message starts
    with the kwarg's name) and becomes a RewardConfigError under `kwargs_field`."""
    try:
        reward = cls(**kwargs)
    except TypeError as e:
        raise RewardConfigError(f"{field}: bad kwargs for {cls.__name__}: {e}") from e
    except ValueError as e:
        raise RewardConfigError(f"{kwargs_field or field}: {cls.__name__}: {e}") from e
    if not callable(getattr(reward, "score", None)) and not callable(getattr(reward, "score_batch", None)):
        raise RewardConfigError(f"{field}: {cls.__name__} has no score(sample) method")
    return reward


def builtin_reward(name: str, kwargs: dict[str, Any], field: str, kwargs_field: str = "") -> Reward:
    if name not in _BUILTINS:
        close = difflib.get_close_matches(name, list(_BUILTINS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else f" Built-in rewards: {', '.join(sorted(_BUILTINS))}."
        raise RewardConfigError(f"{field}: unknown reward '{name}'.{hint} A custom class goes in import_path.")
    return instantiate(load_class(_BUILTINS[name], field), kwargs, field, kwargs_field)


def build_reward(spec: RewardSpec, index: int, section: str = "rewards") -> Reward:
    """The reward a recipe entry names (`reward.<section>[index]`: the trained `rewards` or the monitored `gold`),
    failing with the entry's field path on any problem."""
    field = f"reward.{section}[{index}]"
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
