"""The recipe's rewards as a scorer: its `reward` section turned into the scorer's own config (the rewards leaf
never imports rlkit), and the scorer built in this process. rlkit.runtime.cluster and `python -m rlkit.score` use it."""

from __future__ import annotations

from rlkit.recipe import RecipeError, RewardConfig
from rlkit.rewards import registry
from rlkit.rewards.scorer import Scorer, ScorerConfig


def scorer_config(reward: RewardConfig) -> ScorerConfig:
    """The recipe's `reward` section as the scorer's own config (max_error_rate is the run's check, not the
    scorer's)."""
    specs = tuple(registry.RewardSpec(name=s.name, import_path=s.import_path, weight=s.weight, kwargs=dict(s.kwargs))
                  for s in reward.rewards)
    return ScorerConfig(rewards=specs, num_workers=reward.num_workers, timeout_s=reward.timeout_s,
                        on_error=reward.on_error, error_score=reward.error_score)


def scorer_cpus(reward: RewardConfig) -> int:
    """The CPUs a scorer actor reserves (its num_cpus and its placement bundle): the worker processes its pool spawns,
    which Ray would not count (rewards.pool.WorkerPool starts scorer_config(reward).num_workers of them)."""
    return scorer_config(reward).num_workers


def build_scorer(reward: RewardConfig, make_engine=None) -> Scorer:
    """The scorer of a recipe's rewards, in this process; a reward that cannot be built is a RecipeError, the
    same one-line message the user gets for any other bad recipe field."""
    try:
        return Scorer(scorer_config(reward), make_engine)
    except registry.RewardConfigError as e:
        raise RecipeError(str(e)) from e
