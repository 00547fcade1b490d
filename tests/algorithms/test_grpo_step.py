"""GRPO's step (rlkit.algorithms.grpo.train) on fake workers: what reaches the trainer when the reward policy
excludes samples, and that nothing changes when every sample is scored."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlkit.kernels import group_normalize
from rlkit.rewards.base import RewardResult, Verdict
from rlkit.rewards.scorer import ScoreOutput
from rlkit.algorithms import grpo
from rlkit.algorithms.common import Workers
from rlkit.recipe import AlgoConfig, RecipeConfig, StageConfig
from rlkit.data.tasks import Problem
from rlkit.algorithms.experience import ExperienceMaker, ExperienceSource
from rlkit.algorithms.gold import GoldMonitor
from rlkit.training.losses import PolicyStats
from rlkit.training.rank import Update
from rlkit.rollout.vllm_engine import Completion, SyncStats

LENGTHS = [3, 2, 4, 1, 2, 3, 1, 4]  # completion tokens of the step's 2 prompts x 4 samples


class FakeWorkers:
    """Pool, scorer, trainer, reference and cluster of one step: fixed completions, the test's rewards (None: the
    reward failed and `reward.on_error: exclude` dropped the sample), and the PolicyBatch the trainer gets."""

    def __init__(self, rewards):
        self.rewards, self.batch = rewards, None

    def generate(self, prompt_ids, n, temperature, seed):  # the pool
        lengths = iter(LENGTHS)
        return [[Completion((5,) * k, (-0.5,) * k, "x" * k, True) for k in (next(lengths) for _ in range(n))]
                for _ in prompt_ids]

    def score(self, samples):  # the scorer
        scores = [0.0 if r is None else r for r in self.rewards]  # its placeholder 0 for an excluded sample
        results = [RewardResult(s, Verdict.ERROR if r is None else Verdict.CORRECT) for s, r in zip(scores, self.rewards)]
        return ScoreOutput(scores, results, [r is not None for r in self.rewards])

    def logprobs(self, tokens, temperature=1.0):  # the trainer's and the reference's
        return torch.zeros(tokens.response_mask.shape)

    def step(self, loss, batch):
        self.batch, self.loss = batch, loss
        return Update(PolicyStats(0.0, float(batch.mask.sum()), 0.0, 0.0, 0.0, 0.0, 0.0), 1.0, 0.1)

    def state_dict(self):  # the trainer's weights, which the pool takes
        return {}

    transport = "file"  # the pool's rollout.weight_transfer: sync_weights takes the state dict

    def sync_weights(self, state):
        return SyncStats(0.0, 0.0)

    def reference(self, model_path, trainers=None):  # the cluster
        return self

    def release(self, *workers):
        pass


def run_step(rewards, **algo):
    cfg = RecipeConfig(algo=AlgoConfig(group_size=4, **algo), stages=[StageConfig(kind="grpo", batch_size=2)])
    workers = FakeWorkers(rewards)
    problems = [Problem(f"{i}+1=", str(i + 1), "", prompt_ids=(1, 10 + i)) for i in range(2)]
    ctx = SimpleNamespace(
        cfg=cfg, stage=cfg.stages[0], data=SimpleNamespace(problems=problems, renderer=SimpleNamespace(pad_id=0)),
        workers=Workers(workers, workers, workers, workers, cfg.trainer), model_path="", prefix="grpo", index=0,
        loop=SimpleNamespace(steps=lambda sampler, position: range(1)), seed=lambda: 0, gold=GoldMonitor(10, 0),
        experience_maker=lambda: ExperienceMaker(workers, workers, 0.5, "test"),
        experience_source=lambda produce, sampler: ExperienceSource(produce, 1, 0),
        log=SimpleNamespace(completions=lambda *a: None, show=lambda **kw: None,
                            step=lambda step, metrics, extra: workers.__setattr__("metrics", metrics)))
    grpo.train(ctx)
    return workers.batch, workers.metrics


def test_an_excluded_sample_takes_no_part_in_its_group():
    batch, metrics = run_step([1.0, 1.0, None, 1.0, 1.0, 0.0, 2.0, None])
    # group 0 [1, 1, -, 1] is uniform: zeros (counting the placeholder in gave [0.577, 0.577, 0, 0.577]);
    # group 1 [1, 0, 2, -]: mean 1, population std sqrt(2/3) -> [0, -1.224745, 1.224745, 0]
    s = math.sqrt(1.5)
    assert batch.advantages.tolist() == pytest.approx([0, 0, 0, 0, 0, -s, s, 0], abs=1e-5)
    assert batch.mask.sum(-1).tolist() == [3, 2, 0, 1, 2, 3, 1, 0]  # excluded samples leave the loss
    assert metrics["uniform_group_rate"] == 0.5
    assert metrics["reward/mean"] == pytest.approx(1.0)  # 6 / 6 scored samples, not 6 / 8


def test_dynamic_sampling_drops_groups_uniform_among_their_valid_samples():
    batch, _ = run_step([1.0, 1.0, None, 1.0, 1.0, 0.0, 2.0, None], drop_uniform_groups=True)
    assert batch.mask.sum(-1).tolist() == [0, 0, 0, 0, 2, 3, 1, 0]


def test_every_sample_scored_gives_the_plain_group_normalisation_bit_for_bit():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.7]
    batch, _ = run_step(rewards)
    assert torch.equal(batch.advantages, group_normalize(torch.tensor(rewards), 4))
    assert torch.equal(batch.mask, batch.tokens.response_mask)
    assert batch.normalizer == sum(LENGTHS)  # token-mean, the default


def test_dr_grpo_divides_by_sequences_times_the_generation_budget():
    batch, _ = run_step([1.0, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.7], loss_agg="seq-mean-token-sum-norm",
                        scale_rewards=False)
    assert batch.normalizer == 8 * RecipeConfig().rollout.max_new_tokens
    assert batch.advantages[:4].tolist() == [0.5, -0.5, -0.5, 0.5]  # centred only
