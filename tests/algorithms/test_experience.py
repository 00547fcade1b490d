"""rlkit.algorithms.experience and rlkit.algorithms.onpolicy: the experience layout, the staleness bound of asynchronous
sampling, and minibatch updates with the target_kl early stop."""

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from rlkit.rewards.base import RewardResult, Verdict
from rlkit.rewards.scorer import ScoreOutput
from rlkit.algorithms import onpolicy
from rlkit.recipe import AlgoConfig, RecipeConfig, RolloutConfig
from rlkit.data.tasks import Problem
from rlkit.algorithms.experience import Experience, ExperienceSource, RewardFailure, check_error_rate
from rlkit.training.losses import PolicyStats
from rlkit.training.rank import Update
from rlkit.training.batches import rank_part
from rlkit.runtime.cluster import TrainerGroup
from rlkit.rollout.vllm_engine import Completion


@dataclass(frozen=True)
class ToolEpisode:  # what a multi-turn rollout returns: environment tokens carry loss_mask 0 and log-prob 0
    token_ids: tuple
    logprobs: tuple
    text: str
    finished: bool
    loss_mask: tuple


def experience(completions, group_size=2):
    problems = [Problem(f"p{i}", "1", "", prompt_ids=(1, 2, 3)[: i + 2]) for i in range(len(completions) // group_size)]
    scored = ScoreOutput([1.0] * len(completions), [RewardResult(1.0, Verdict.CORRECT)] * len(completions),
                         [True] * len(completions))
    return Experience(problems, [list(p.prompt_ids) for p in problems], completions, scored, group_size)


def test_the_layout_is_prompt_major_and_environment_tokens_leave_the_loss():
    exp = experience([Completion((7, 8), (-0.1, -0.2), "a", True), Completion((9,), (-0.3,), "b", True),
                      ToolEpisode((7, 50, 51, 8), (-0.4, 0.0, 0.0, -0.5), "c", True, (1, 0, 0, 1)),
                      Completion((6,), (-0.6,), "d", False)])
    assert (exp.batch_size, exp.group(1)) == (2, slice(2, 4))
    tokens = exp.token_batch(pad_id=0)  # prompts (1, 2) and (1, 2, 3): targets start at 1 and 2
    assert tokens.input_ids.tolist() == [[1, 2, 7, 8, 0, 0, 0], [1, 2, 9, 0, 0, 0, 0], [1, 2, 3, 7, 50, 51, 8],
                                         [1, 2, 3, 6, 0, 0, 0]]
    assert tokens.response_mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1],
                                             [0, 0, 1, 0, 0, 0]]
    assert exp.rollout_logprobs(6)[2].tolist() == pytest.approx([0, 0, -0.4, 0, 0, -0.5])
    assert [s.completion for s in exp.samples()] == ["a", "b", "c", "d"]


def test_a_reward_failing_on_most_samples_stops_the_run():
    scored = ScoreOutput([0.0] * 4, [RewardResult(0.0, Verdict.ERROR)] * 4, [False] * 4, {"errors": 3.0})
    with pytest.raises(RewardFailure, match="3 of 4 samples"):
        check_error_rate(scored, 0.5, "stage 0 (grpo)")


def run_loop(max_staleness: int, steps: int = 6, produce_s: float = 0.01, train_s: float = 0.03):
    """A step loop over an ExperienceSource: each step trains (sleeps) then syncs. Returns the (step, version)
    of every batch trained on and the log of events in order."""
    events, trained = [], []
    lock = threading.Lock()

    def produce(step, version):
        with lock:
            events.append(("sample", step, version))
        time.sleep(produce_s)
        return SimpleNamespace(step=step, version=version, sampler_position=step + 1)

    with ExperienceSource(produce, steps, max_staleness) as source:
        for step in range(steps):
            exp = source.get(step)
            assert exp.step == step and source.position == step + 1
            trained.append((step, exp.version))
            time.sleep(train_s)
            with lock:
                events.append(("synced", step, None))
            source.synced()
    return trained, events


def test_on_policy_samples_each_batch_from_the_latest_update():
    trained, events = run_loop(0)
    assert trained == [(k, k) for k in range(6)]
    assert [e[0] for e in events] == ["sample", "synced"] * 6  # strict alternation


@pytest.mark.parametrize("staleness", [1, 2])
def test_asynchronous_sampling_runs_ahead_within_the_staleness_bound(staleness):
    trained, events = run_loop(staleness)
    assert [s for s, _ in trained] == list(range(6))
    assert all(0 <= step - version <= staleness for step, version in trained)
    # the sampler ran ahead: batch 1 was sampled before the update on batch 0 finished
    assert events.index(("sample", 1, 0)) < events.index(("synced", 0, None))
    # and never further than the bound: batch k waits for version k - N
    for _, k, version in (e for e in events if e[0] == "sample"):
        synced_before = sum(1 for e in events[: events.index(("sample", k, version))] if e[0] == "synced")
        assert synced_before >= k - staleness


def test_an_error_in_the_sampler_thread_reaches_the_loop():
    def produce(step, version):
        raise ValueError("engine died")

    with ExperienceSource(produce, 3, 1) as source:
        with pytest.raises(ValueError, match="engine died"):
            source.get(0)


class FakeTrainer:
    """A trainer rank's step: records each optimizer step's rows and normaliser, and the step batch it was sent;
    approx_kl grows per step."""

    def __init__(self):
        self.steps, self.sent = [], []

    def step(self, loss, batch, rows=None, normalizer=None):
        self.sent.append(batch)
        batch = rank_part(batch, rows, normalizer)
        self.steps.append((batch.advantages.tolist(), batch.normalizer))
        tokens = float(batch.mask.sum())
        return Update(PolicyStats(1.0, tokens, 0.0, 0.0, 0.01 * len(self.steps) * tokens, 0.0), 1.0, 0.1)


def policy_batch(rows=8):
    exp = experience([Completion((5,) * (1 + i % 3), (-0.5,) * (1 + i % 3), "x", True) for i in range(rows)])
    tokens = exp.token_batch(0)
    cfg = RecipeConfig()
    return onpolicy.policy_batch(cfg, exp, tokens, tokens.response_mask, None, None, torch.arange(rows).float())


def update(batch, **algo):
    trainer = FakeTrainer()  # the one rank of an in-process group
    ctx = SimpleNamespace(cfg=RecipeConfig(algo=AlgoConfig(**algo), rollout=RolloutConfig()),
                          workers=SimpleNamespace(trainer=TrainerGroup([trainer])), seed=lambda: 0)
    metrics = onpolicy.update_policy(ctx, batch, step=3)
    assert all(sent is batch for sent in trainer.sent)  # the step batch itself, its rows picked by the rank
    return metrics, trainer.steps


def test_one_minibatch_passes_the_whole_batch_in_order():
    batch = policy_batch()
    metrics, steps = update(batch)
    assert steps == [(list(range(8)), batch.normalizer)]
    assert "update/minibatch_steps" not in metrics and metrics["approx_kl"] == pytest.approx(0.01)


def test_minibatches_cover_the_batch_once_per_epoch_each_with_its_own_normaliser():
    batch = policy_batch()
    metrics, steps = update(batch, ppo_epochs=2, ppo_minibatches=4)
    assert len(steps) == 8 and metrics["update/minibatch_steps"] == 8
    for epoch in (steps[:4], steps[4:]):
        rows = sorted(int(a) for advantages, _ in epoch for a in advantages)
        assert rows == list(range(8))  # a permutation of the rows, 2 per minibatch
        for advantages, normalizer in epoch:  # token-mean over the minibatch's own tokens: 1 + i % 3 each
            assert normalizer == sum(1 + int(a) % 3 for a in advantages)
    assert steps[0][0] != [0.0, 1.0]  # shuffled
    assert metrics["approx_kl"] == pytest.approx(0.01 * sum(range(1, 9)) / 8)  # the mean over the steps


def test_target_kl_stops_the_update_at_the_first_minibatch_past_it():
    metrics, steps = update(policy_batch(), ppo_epochs=4, ppo_minibatches=2, target_kl=0.025)
    assert len(steps) == 3  # approx_kl 0.01, 0.02, then 0.03 > 0.025
    assert metrics["update/early_stop"] == 1.0 and metrics["update/minibatch_steps"] == 3


def test_padding_fraction_and_update_speed():
    rows = [Completion((5, 5, 5), (0.0,) * 3, "x", True), Completion((5,), (0.0,), "y", True)]
    tokens = experience(rows).token_batch(0)
    metrics = onpolicy.token_metrics(tokens, train_seconds=2.0)  # rows of 5 and 3 real tokens, width 5
    assert metrics["tokens/padding_fraction"] == pytest.approx(2 / 10)
    assert metrics["perf/update_tokens_per_s"] == pytest.approx(4.0)


def test_episodes_are_scored_on_their_last_answer_plus_the_environments_parts():
    """ExperienceMaker with a multi-turn sampler: the rewards score each episode's last answer (`text`), the
    environment's reward parts are added (an excluded sample keeps its placeholder) and logged as reward/env/*."""
    from rlkit.algorithms.experience import ExperienceMaker

    @dataclass(frozen=True)
    class Episode(ToolEpisode):
        reward_parts: dict = None
        prompt_ids: tuple = ()

    def episodes(problems, n, temperature, seed):
        return [[Episode((7, 50, 8), (-0.1, 0.0, -0.2), "42", True, (1, 0, 1), {"tool_error": -0.5 * j})
                 for j in range(n)] for _ in problems]

    class Scorer:
        def score(self, samples):
            assert [s.completion for s in samples] == ["42"] * 4  # the last answer, not the transcript
            return ScoreOutput([1.0, 1.0, 0.0, 1.0], [RewardResult(1.0, Verdict.CORRECT)] * 4,
                               [True, True, False, True], proxy=[2.0, 2.0, 0.0, 2.0])  # beside gold rewards

    problems = [Problem("6*7=", "42", "42", prompt_ids=(1, 2)), Problem("2*21=", "42", "42", prompt_ids=(1, 3))]
    exp = ExperienceMaker(None, Scorer(), 1.0, "test", episodes=episodes).make(problems, 2, 1.0, seed=0)
    assert exp.scored.scores == [1.0, 0.5, 0.0, 0.5]
    assert exp.scored.proxy == [2.0, 1.5, 0.0, 1.5]  # the environment's parts are trained on: part of the proxy
    assert exp.scored.stats["env/tool_error"] == pytest.approx(-0.25)
    assert exp.token_batch(0).response_mask.tolist()[0] == [0, 1, 0, 1]  # the tool's token (50) leaves the loss


def test_a_batch_filled_over_sampling_rounds_keeps_each_samples_gold_and_proxy():
    """GRPO's algo.resample_rounds: the batch is picked from several rounds' groups; each picked sample keeps its
    gold result and its proxy (the gold monitor reads both)."""
    from rlkit.algorithms.experience import ExperienceMaker
    from rlkit.data.tasks import BatchSampler

    class Rounds(ExperienceMaker):  # round r: one prompt "r<r>", rewards (0, 0) then (0, 1): uniform, then not
        def make(self, problems, n, temperature, seed, version=0):
            r = len(self.made)
            self.made.append(r)
            rewards = [0.0, float(r)]
            scored = ScoreOutput(rewards, [RewardResult(x, Verdict.WRONG) for x in rewards], [True, True],
                                 gold_results=[RewardResult(10.0 * r + k, Verdict.WRONG) for k in range(2)],
                                 proxy=[100.0 * r + k for k in range(2)])
            return Experience([Problem(f"r{r}", "1", "", prompt_ids=(1, 2))], [[1, 2]],
                              [Completion((7,), (-0.1,), "a", True)] * 2, scored, 2)

    maker = Rounds(pool=None, scorer=None, max_error_rate=1.0, where="test")
    maker.made = []
    exp = maker.make_groups(BatchSampler([Problem("p", "1", "")], 1, 0), 2, 1.0, 0, rounds=3)
    assert [p.prompt for p in exp.problems] == ["r1"]  # round 0's group was uniform, round 1's was not
    assert [r.score for r in exp.scored.gold_results] == [10.0, 11.0] and exp.scored.proxy == [100.0, 101.0]
