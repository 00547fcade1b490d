"""The recipe's rewards as they score during a run (rlkit.runtime.scoring.live_rewards): a model reward that names a
reward_model stage joins, with that stage's checkpoint folder, once the stage has trained."""

from rlkit.recipe import load_recipe
from rlkit.runtime.scoring import live_rewards, names_stage, scorer_config

CHAIN = ["reward.rewards=[{name: math, weight: 0}, {name: model, path: rm, weight: 1, kwargs: {normalize: true}}]",
         "stages=[{kind: sft}, {kind: reward_model, name: rm}, {kind: grpo}]"]


def test_a_stage_named_reward_model_joins_once_its_stage_has_trained():
    cfg = load_recipe(None, CHAIN)  # SFT -> reward model -> GRPO on it loads
    assert [s.name for s in live_rewards(cfg, "/runs/x", 0).rewards] == ["math"]
    assert [s.name for s in live_rewards(cfg, "/runs/x", 1).rewards] == ["math"]  # still training
    after = live_rewards(cfg, "/runs/x", 2).rewards
    assert [(s.name, s.path) for s in after] == [("math", ""), ("model", "/runs/x/checkpoints/rm")]
    assert [names_stage(cfg, i) for i in range(3)] == [False, True, False]
    model = scorer_config(live_rewards(cfg, "/runs/x", 2)).rewards[1]
    assert dict(model.kwargs) == {"normalize": True, "path": "/runs/x/checkpoints/rm"}
