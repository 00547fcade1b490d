"""The recipe's rewards as a scorer: its `reward` section turned into the scorer's own config (the rewards leaf
never imports rlkit), the scorer built in this process, and several scorers as one (`ScorerGroup`, on Ray
cluster.scorer_actors actors). rlkit.runtime.cluster and `python -m rlkit.score` use it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from rlkit.recipe import RecipeConfig, RecipeError, RewardConfig
from rlkit.recipe.stage_kinds import checkpoint_name, reward_model_stage
from rlkit.rewards import registry
from rlkit.rewards.base import Sample
from rlkit.rewards.scorer import ScoreOutput, Scorer, ScorerConfig


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


class ScorerGroup:
    """S scorers (cluster.scorer_actors), in this process or Ray actors (rlkit.runtime.cluster; `resolve` is ray.get
    there). A batch's samples are split into S contiguous shares, each scored by one scorer at once
    (`Scorer.outcomes`); the first then combines the shares' outcomes in the batch's order (`Scorer.combine`, handed
    the others' object refs, which Ray resolves peer to peer): scores, the reward policy (reward.on_error) and the
    stats are the whole batch's, as one scorer's. A batched reward (the LLM judge) runs once per share, each
    scorer with its own engine."""

    def __init__(self, scorers: list, resolve: Callable[[list], list] = lambda values: values):
        self.scorers, self._resolve = scorers, resolve
        self.placement_group = None  # on Ray: the scorers' reservation (spread over the nodes)

    def score(self, samples: list[Sample]) -> ScoreOutput:
        samples = list(samples)
        if len(self.scorers) == 1:
            return self._resolve([self.scorers[0].score(samples)])[0]
        shares = [samples[part] for part in contiguous_shares(len(samples), len(self.scorers))]
        outcomes = [scorer.outcomes(share) for scorer, share in zip(self.scorers, shares) if share]
        return self._resolve([self.scorers[0].combine(samples, *outcomes)])[0]

    def close(self) -> None:
        self._resolve([s.close() for s in self.scorers])


def contiguous_shares(n: int, k: int) -> list[slice]:
    """n items in k contiguous shares of ceil(n / k) (the last ones shorter or empty), so results concatenated in
    share order are in the items' order.

    >>> contiguous_shares(5, 2), contiguous_shares(2, 3)
    ([slice(0, 3, None), slice(3, 5, None)], [slice(0, 1, None), slice(1, 2, None), slice(2, 2, None)])
    """
    size = -(-n // k)
    return [slice(min(i * size, n), min((i + 1) * size, n)) for i in range(k)]
