"""The advantage estimators' contract: samples the reward policy excluded take no part in their group."""

import pytest
import torch

from rlkit.algorithms.advantages import compute_advantages, get_estimator, register_estimator, uniform_groups
from rlkit.recipe import AlgoConfig, RecipeError

# one group of four, the third sample excluded (its reward a placeholder 0.0 from the scorer)
REWARDS, VALID = torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([True, True, False, True])


@pytest.mark.parametrize("name", ["grpo", "rloo", "reinforce_pp"])
def test_an_excluded_sample_does_not_shape_its_group(name):
    # [1, 1, excluded, 1] is a uniform group: no signal. Counting the placeholder in, GRPO would give
    # [0.577, 0.577, 0, 0.577] (mean 0.75, std 0.433).
    adv = compute_advantages(get_estimator(name), REWARDS, VALID, 4, AlgoConfig())
    assert adv.tolist() == [0.0] * 4


def test_reinforce_pp_scales_by_the_valid_samples_only():
    # groups [1, 0 | excluded, 1]: the first centres to [0.5, -0.5]; the second has one valid sample (0).
    # Batch std over the three valid samples: sqrt((0.25 + 0.25 + 0) / 3) = 0.408248 -> 0.5 / 0.408248 = 1.224745
    rewards, valid = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([True, True, False, True])
    adv = compute_advantages(get_estimator("reinforce_pp"), rewards, valid, 2, AlgoConfig())
    assert adv.tolist() == pytest.approx([1.224745, -1.224745, 0.0, 0.0], abs=1e-5)


def test_the_contract_holds_for_a_custom_estimator_that_ignores_valid():
    # An estimator that hands every sample its raw reward: the excluded sample and the one-valid group get 0.
    raw = lambda rewards, valid, group_size, algo: rewards.clone()  # noqa: E731
    rewards, valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), torch.tensor([True, False, True, False, False, True])
    adv = compute_advantages(raw, rewards, valid, 3, AlgoConfig())
    assert adv.tolist() == [1.0, 0.0, 3.0, 0.0, 0.0, 0.0]


def test_an_estimator_without_valid_fails_at_load():
    with pytest.raises(RecipeError, match=r"must be a function \(rewards, valid, group_size, algo\)"):
        register_estimator("old_contract", lambda rewards, group_size, algo: rewards)
    with pytest.raises(RecipeError, match="rewards, valid, group_size, algo"):
        get_estimator("tests.algorithms.test_advantages:three_argument_estimator")


def three_argument_estimator(rewards, group_size, algo):
    return rewards


def test_uniform_groups_look_at_valid_rewards_only():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, True, True, True, False, False, True, False, False, False])
    # [1, 1, -, 1] uniform; [1, 0, -, -] not; [2, -, -, -] has nothing to compare: uniform
    assert uniform_groups(rewards, 4, valid)[::4].tolist() == [True, False, True]
    assert uniform_groups(rewards, 4)[::4].tolist() == [False, False, False]
