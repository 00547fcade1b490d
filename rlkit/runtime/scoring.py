"""The recipe's rewards as a scorer: its `reward` section turned into the scorer's own config (the rewards leaf
never imports rlkit), and the scorer built in this process. rlkit.runtime.cluster and `python -m rlkit.score` use it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rlkit.recipe import RecipeConfig, RecipeError, RewardConfig
from rlkit.recipe.stage_kinds import checkpoint_name, reward_model_stage
from rlkit.rewards import registry
from rlkit.rewards.scorer import Scorer, ScorerConfig


def live_rewards(cfg: RecipeConfig, run_dir: str | Path, stages_done: int) -> RewardConfig:
    """The recipe's `reward` section as it scores once `stages_done` stages have run: a model reward whose `path`
    names a reward_model stage scores with that stage's checkpoint (RUN_DIR/checkpoints/<folder>) once the stage
    has trained, and is left out before (the recipe check refuses a stage that would train on the rewards then)."""
    rewards = []
    for spec in cfg.reward.rewards:
        j = reward_model_stage(cfg.stages, spec.path) if spec.path else None
        if j is None:
            rewards.append(spec)
        elif j < stages_done:
            rewards.append(replace(spec, path=str(Path(run_dir) / "checkpoints" / checkpoint_name(cfg.stages[j], j))))
    return replace(cfg.reward, rewards=rewards)


def names_stage(cfg: RecipeConfig, index: int) -> bool:
    """Whether a reward scores with stage `index`'s checkpoint (a scorer made before it must be made again)."""
    return any(s.path and reward_model_stage(cfg.stages, s.path) == index for s in cfg.reward.rewards)


def scorer_config(reward: RewardConfig) -> ScorerConfig:
    """The recipe's `reward` section as the scorer's own config (max_error_rate is the run's check, not the
    scorer's); a model reward's `path` goes to its constructor."""
    def specs(entries) -> tuple:
        return tuple(registry.RewardSpec(name=s.name, import_path=s.import_path, weight=s.weight,
                                         kwargs=dict(s.kwargs) | ({"path": s.path} if s.path else {}))
                     for s in entries)

    return ScorerConfig(rewards=specs(reward.rewards), num_workers=reward.num_workers, timeout_s=reward.timeout_s,
                        on_error=reward.on_error, error_score=reward.error_score, gold=specs(reward.gold))


def build_scorer(reward: RewardConfig, make_engine=None) -> Scorer:
    """The scorer of a recipe's rewards, in this process; a reward that cannot be built is a RecipeError, the
    same one-line message the user gets for any other bad recipe field."""
    try:
        return Scorer(scorer_config(reward), make_engine)
    except registry.RewardConfigError as e:
        raise RecipeError(str(e)) from e
