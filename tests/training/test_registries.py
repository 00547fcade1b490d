"""One registry per named switch: each holds the same names as the torch-free tuple the recipe checks against
(rlkit.recipe.names), and a recipe may name its own implementation by import path instead."""

import pytest
import torch

from rlkit.algorithms.episodes import ENVIRONMENTS
from rlkit.recipe import RecipeError, load_recipe, names
from rlkit.training.losses import (DPO_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PolicyLoss,
                                   policy_loss, resolve_switches)
from rlkit.training.batches import PolicyBatch, TokenBatch
from rlkit.training.losses import Forward

REGISTRIES = [(POLICY_LOSSES, names.POLICY_LOSSES), (KL_ESTIMATORS, names.KL_ESTIMATORS),
              (DPO_LOSSES, names.DPO_LOSSES), (LOSS_AGGREGATIONS, names.LOSS_AGGREGATIONS),
              (ENVIRONMENTS, names.ENVIRONMENTS)]


@pytest.mark.parametrize("registry, tuple_", REGISTRIES, ids=lambda r: getattr(r, "key", ""))
def test_the_registry_holds_the_names_the_recipe_checks(registry, tuple_):
    assert registry.registered() == tuple_ == registry.names


def halved_clip(logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high):
    """A user's policy loss: the clipped surrogate at half weight."""
    loss, clipped = policy_loss(logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high)
    return 0.5 * loss, clipped


def test_a_users_policy_loss_comes_in_by_import_path():
    path = f"{__name__}:halved_clip"
    cfg = load_recipe(None, ["stages=[{kind: grpo}]", f"algo.pg_loss={path}"])
    resolve_switches(cfg.algo, cfg.ref)
    g = torch.Generator().manual_seed(0)
    logprobs, old = -torch.rand(2, 3, generator=g), -torch.rand(2, 3, generator=g)
    tokens = TokenBatch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3))
    batch = PolicyBatch(tokens, torch.ones(2, 3), old, None, old, torch.tensor([1.0, -1.0]), 6.0)
    out = Forward(logprobs, torch.zeros(2, 3))
    ours = PolicyLoss.from_config(cfg.algo, cfg.ref, 1.0)(out, batch)[0]
    builtin = PolicyLoss.from_config(load_recipe(None, ["stages=[{kind: grpo}]"]).algo, cfg.ref, 1.0)(out, batch)[0]
    assert ours.item() == pytest.approx(0.5 * builtin.item())


def test_a_bad_switch_fails_at_load_or_before_the_run():
    with pytest.raises(RecipeError, match=r"algo.pg_loss: 'ppo' is not one of clip, cispo \(or 'pkg.module:name'"):
        load_recipe(None, ["algo.pg_loss=ppo"])
    cfg = load_recipe(None, ["ref.kl_estimator=tests.training.no_such_module:k9"])
    with pytest.raises(RecipeError, match="ref.kl_estimator: cannot import module 'tests.training.no_such_module'"):
        resolve_switches(cfg.algo, cfg.ref)
