"""The gold-reward monitor's math (rlkit.algorithms.gold), with values worked out by hand in the comments."""

from dataclasses import replace

import pytest

from rlkit.algorithms.gold import GoldMonitor, gold_drop_streak, group_correlation, pearson, slope, step_gold_metrics
from rlkit.rewards.base import RewardResult, Verdict
from rlkit.rewards.scorer import ScoreOutput

C, W, E = Verdict.CORRECT, Verdict.WRONG, Verdict.ERROR


def test_pearson_by_hand():
    # x = 0, 1, 2, 3 (mean 1.5, deviations -1.5 -0.5 0.5 1.5, sum of squares 5)
    # y = 1, 0, 1, 1 (mean 0.75, deviations 0.25 -0.75 0.25 0.25, sum of squares 0.75)
    # sxy = -0.375 + 0.375 + 0.125 + 0.375 = 0.5; r = 0.5 / sqrt(5 * 0.75) = 0.5 / 1.93649 = 0.258199
    assert pearson([0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 1.0, 1.0]) == pytest.approx(0.2581989)
    assert pearson([1.0, 2.0], [5.0, 3.0]) == pytest.approx(-1.0)  # two points: a line, falling
    assert pearson([2.0, 4.0, 6.0], [0.0, 1.0, 2.0]) == pytest.approx(1.0)  # invariant to scale and shift
    assert pearson([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) is None  # a constant gold: undefined, not 0
    assert pearson([1.0], [1.0]) is None
    with pytest.raises(ValueError):
        pearson([1.0, 2.0], [1.0])


def test_slope_by_hand():
    # index 0..3 (mean 1.5, sum of squared deviations 5); values 0, 1, 1, 3 (mean 1.25)
    # num = -1.5*-1.25 + -0.5*-0.25 + 0.5*-0.25 + 1.5*1.75 = 1.875 + 0.125 - 0.125 + 2.625 = 4.5; slope 0.9
    assert slope([0.0, 1.0, 1.0, 3.0]) == pytest.approx(0.9)
    assert slope([5.0, 5.0, 5.0]) == 0.0
    assert slope([3.0, 1.0]) == -2.0
    assert slope([]) is None


def test_gold_drop_streak_counts_only_falls_with_a_rising_proxy():
    proxy = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert gold_drop_streak(proxy, [0.5, 0.6, 0.7, 0.6, 0.5]) == 2
    assert gold_drop_streak(proxy, [0.9, 0.8, 0.7, 0.6, 0.5]) == 4
    assert gold_drop_streak(proxy, [0.9, 0.8, 0.7, 0.6, 0.6]) == 0  # gold flat at the last: no fall
    assert gold_drop_streak([0.0, 1.0, 1.0], [0.9, 0.8, 0.7]) == 0  # both falling is no over-optimisation
    assert gold_drop_streak([0.0, 1.0, 0.5, 0.9], [0.9, 0.8, 0.7, 0.6]) == 1  # the proxy dipped at evaluation 2
    assert gold_drop_streak([1.0], [1.0]) == 0


def test_step_metrics_over_the_samples_both_rewards_scored():
    # rows 0..3 kept, row 4 dropped (e.g. a gold error): proxy 2, 0, 1, 1 (mean 1); gold 1, 0, 1, 0 (mean 0.5)
    # deviations proxy 1 -1 0 0 (ss 2), gold .5 -.5 .5 -.5 (ss 1); sxy = .5 + .5 = 1; r = 1 / sqrt(2) = 0.7071
    out = step_gold_metrics([2.0, 0.0, 1.0, 1.0, 9.0], [1.0, 0.0, 1.0, 0.0, 0.0], [C, W, C, W, E],
                            [True, True, True, True, False])
    assert out == pytest.approx({"gold/proxy_mean": 1.0, "gold/mean": 0.5, "gold/gap": 0.5, "gold/accuracy": 0.5,
                                 "gold/correlation": 2 ** -0.5})
    assert "gold/correlation" not in step_gold_metrics([1.0, 2.0], [1.0, 1.0], [C, C], [True, True])
    assert step_gold_metrics([1.0], [1.0], [C], [False]) == {}


def scored(proxy, gold, gold_verdicts, valid=None):
    results = [RewardResult(p, W) for p in proxy]
    golds = [RewardResult(g, v) for g, v in zip(gold, gold_verdicts)]
    return ScoreOutput(list(proxy), results, valid or [True] * len(proxy), {}, golds)


def test_monitor_gap_trend_over_its_window():
    monitor = GoldMonitor(window=3, stop_after=0)
    gaps = []
    for proxy in ([1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [7.0, 7.0]):  # gold stays 0: gap = proxy mean 1, 2, 4, 7
        out = monitor.step(scored(proxy, [0.0, 0.0], [W, W]), [True, True])
        gaps.append(out.get("gold/gap_slope"))
    # 1 step: no slope; [1, 2]: 1; [1, 2, 4]: (4 - 1) / 2 = 1.5; window 3 keeps [2, 4, 7]: (7 - 2) / 2 = 2.5
    assert gaps == [None, 1.0, 1.5, 2.5]
    # a gold error and an excluded sample both leave the batch's statistics
    out = monitor.step(scored([5.0, 3.0, 1.0], [1.0, 0.0, 0.0], [C, E, W], [True, True, False]), [True, True, False])
    assert out["gold/proxy_mean"] == 5.0 and out["gold/mean"] == 1.0 and out["gold/accuracy"] == 1.0


def test_monitor_reads_the_proxy_on_its_own_scale():
    # scores normalised per batch (z-scores -1, 1); ScoreOutput.proxy holds the raw 3 and 1: mean 2, gap 2 - 0.5
    out = GoldMonitor(window=3, stop_after=0).step(replace(scored([-1.0, 1.0], [1.0, 0.0], [C, W]), proxy=[3.0, 1.0]),
                                                   [True, True])
    assert (out["gold/proxy_mean"], out["gold/gap"], out["gold/correlation"]) == (2.0, 1.5, 1.0)


def test_monitor_without_gold_rewards_is_inert():
    monitor = GoldMonitor(window=10, stop_after=2, start={"accuracy": 0.5, "mean_reward": 0.5})
    assert monitor.step(ScoreOutput([1.0], [RewardResult(1.0, C)], [True]), [True]) == {}
    assert not any(monitor.observe({"mean_reward": float(k)}) for k in range(5))


def test_monitor_stops_after_n_gold_drops_with_a_rising_proxy_counting_the_stage_start():
    start = {"mean_reward": 0.0, "gold/mean_reward": 0.5}  # the evaluation before the stage's first step
    monitor = GoldMonitor(window=10, stop_after=2, start=start)
    evaluations = [(1.0, 0.6), (2.0, 0.55), (2.5, 0.5)]  # gold rises, then falls twice while the proxy rises
    stops = [monitor.observe({"mean_reward": p, "gold/mean_reward": g}) for p, g in evaluations]
    assert stops == [False, False, True]
    # a proxy normalised per batch has mean_reward 0 at every evaluation: gold/proxy_mean_reward is its own scale
    own = GoldMonitor(window=10, stop_after=2, start=start | {"gold/proxy_mean_reward": 0.0})
    assert [own.observe({"mean_reward": 0.0, "gold/proxy_mean_reward": p, "gold/mean_reward": g})
            for p, g in evaluations] == [False, False, True]
    never = GoldMonitor(window=10, stop_after=0, start=start)
    assert not any(never.observe({"mean_reward": p, "gold/mean_reward": g}) for p, g in evaluations)


def test_group_correlation_averages_each_prompts_own():
    # group 0: proxy 1, 2, 3 against gold 0, 0, 1: deviations (-1, 0, 1) and (-1/3, -1/3, 2/3), sxy = 1, sxx = 2,
    # syy = 2/3: r = 1 / sqrt(4/3) = 0.866025; group 1: proxy 1, 2, 3 against gold 1, 1, 0: sxy = -1/3 - 2/3 = -1,
    # r = -0.866025 ... but its third sample is dropped: (1, 2) against (1, 1) is a constant gold, left out
    proxy, gold = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    keep = [True, True, True, True, True, False]
    assert group_correlation(proxy, gold, keep, 3) == pytest.approx(0.8660254)
    assert group_correlation(proxy, gold, [True] * 6, 3) == pytest.approx(0.0)  # +0.866 and -0.866
    # across the batch the prompts' offsets can hide it: proxy 10, 11 / 0, 1 against gold 0, 1 / 0, 1
    across = step_gold_metrics([10.0, 11.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0], [W, C, W, C], [True] * 4, 2)
    assert across["gold/group_correlation"] == pytest.approx(1.0)
    assert across["gold/correlation"] == pytest.approx(0.0995037)  # sxy 1, sxx 101, syy 1: 1 / sqrt(101)
    assert "gold/group_correlation" not in step_gold_metrics([1.0, 2.0], [0.0, 1.0], [W, C], [True, True], 1)
