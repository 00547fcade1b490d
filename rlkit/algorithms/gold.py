"""The gold-reward monitor: a proxy reward the stage trains on (e.g. a trained reward model) watched against gold
rewards it never trains on (`reward.gold`, e.g. the math verifier), for the over-optimisation of Gao et al. 2022
("Scaling Laws for Reward Model Overoptimization"): past some distance from the start, the proxy keeps rising while
the gold reward falls.

Each GRPO/PPO step logs, over the batch's samples both could score, the proxy's and the gold's mean, the gap
(proxy - gold, in the rewards' own units: a reward model's scale is its own, so the gap's level means little and its
trend much), the gap's least-squares slope over the last `reward.gold_window` steps, and the Pearson correlation of
proxy and gold across the batch and, averaged over prompts, within each prompt's group of samples, which is what a
group-normalised advantage sees (low or falling: the proxy no longer ranks samples as the gold does). At each held-out
evaluation inside a stage, `reward.stop_on_gold_drop: N` stops the stage once the gold reward fell at N consecutive
evaluations while the proxy rose at each (the stage's evaluation before its first step counts as the first).
A run resumed mid-stage starts both over: the trend's window empty, the evaluations counted from the stage's first
one (the mid-stage evaluations before the resume point are not kept with it).
"""

from __future__ import annotations

import math
from collections import deque

from rlkit.rewards.base import Verdict


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson's correlation of paired values; None where it is undefined (fewer than 2 pairs, or either side
    constant).

    >>> pearson([1.0, 2.0, 3.0], [2.0, 4.0, 7.0])  # doctest: +ELLIPSIS
    0.9933...
    >>> pearson([1.0, 1.0], [0.0, 1.0]) is None
    True
    """
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} values against {len(y)}")
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx <= 0.0 or syy <= 0.0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def slope(values: list[float]) -> float | None:
    """Least-squares slope of `values` against their index (change per step); None for fewer than 2 values.

    >>> slope([1.0, 3.0, 5.0]), slope([2.0, 0.0, 1.0]), slope([4.0]) is None
    (2.0, -0.5, True)
    """
    n = len(values)
    if n < 2:
        return None
    mean_i, mean_v = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_i) * (v - mean_v) for i, v in enumerate(values))
    return num / sum((i - mean_i) ** 2 for i in range(n))


def gold_drop_streak(proxy: list[float], gold: list[float]) -> int:
    """How many of the latest evaluations in a row saw the gold reward fall while the proxy rose, each against the
    evaluation before it (`proxy[k]`, `gold[k]`: evaluation k's held-out means).

    >>> gold_drop_streak([0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.5, 0.4])
    2
    >>> gold_drop_streak([0.1, 0.2, 0.2], [0.5, 0.4, 0.3])  # the proxy did not rise at the last one
    0
    """
    if len(proxy) != len(gold):
        raise ValueError(f"gold_drop_streak: {len(proxy)} proxy values against {len(gold)} gold values")
    streak = 0
    for k in range(len(proxy) - 1, 0, -1):
        if not (gold[k] < gold[k - 1] and proxy[k] > proxy[k - 1]):
            break
        streak += 1
    return streak


def group_correlation(proxy: list[float], gold: list[float], keep: list[bool], group_size: int) -> float | None:
    """The mean over prompt groups (rows i*G .. i*G+G-1) of proxy and gold's Pearson correlation among a group's kept
    samples: what a group-normalised advantage sees, free of each prompt's own offset. Groups where it is undefined
    (gold or proxy constant, fewer than 2 kept) are left out; None when no group has one.

    >>> group_correlation([1.0, 2.0, 3.0, 5.0], [0.0, 1.0, 1.0, 0.0], [True] * 4, 2)  # +1 and -1
    0.0
    >>> group_correlation([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 1.0], [True] * 4, 2)  # the second group is constant
    1.0
    """
    values = []
    for start in range(0, len(proxy), group_size):
        rows = [i for i in range(start, min(start + group_size, len(proxy))) if keep[i]]
        r = pearson([proxy[i] for i in rows], [gold[i] for i in rows])
        if r is not None:
            values.append(r)
    return sum(values) / len(values) if values else None


def step_gold_metrics(proxy: list[float], gold: list[float], gold_verdicts: list[Verdict],
                      keep: list[bool], group_size: int = 1) -> dict[str, float]:
    """One batch's proxy and gold rewards (N,) over the samples `keep` marks (scorable by both): means, gap, the
    gold's accuracy (its first reward's verdict CORRECT), their correlation over the batch and, with prompt groups of
    `group_size` > 1 (GRPO), within groups (each left out where undefined)."""
    p = [v for v, k in zip(proxy, keep) if k]
    g = [v for v, k in zip(gold, keep) if k]
    if not p:
        return {}
    out = {"gold/proxy_mean": sum(p) / len(p), "gold/mean": sum(g) / len(g),
           "gold/accuracy": sum(v == Verdict.CORRECT for v, k in zip(gold_verdicts, keep) if k) / len(p)}
    out["gold/gap"] = out["gold/proxy_mean"] - out["gold/mean"]
    r = pearson(p, g)
    out |= {} if r is None else {"gold/correlation": r}
    within = group_correlation(proxy, gold, keep, group_size) if group_size > 1 else None
    return out if within is None else out | {"gold/group_correlation": within}


class GoldMonitor:
    """A stage's view of proxy against gold: per-step metrics with the gap's trend, and the early-stop rule over its
    held-out evaluations. Inert (no metrics, never stops) when the recipe has no gold rewards."""

    def __init__(self, window: int, stop_after: int, start: dict | None = None):
        self.stop_after = stop_after  # reward.stop_on_gold_drop (0: never)
        self.gaps: deque[float] = deque(maxlen=window)  # the last `window` steps' proxy - gold
        self.proxy: list[float] = []  # held-out proxy mean per evaluation, from the stage's start
        self.gold: list[float] = []
        if start and "gold/mean_reward" in start:  # the evaluation before the stage's first step
            self.observe(start)

    def step(self, scored, scorable: list[bool], group_size: int = 1) -> dict[str, float]:
        """A step's metrics from its ScoreOutput (proxy: the trained rewards' score; gold: reward.gold's);
        `scorable` (N,) marks the samples the trained rewards could score; `group_size` samples per prompt."""
        if not scored.gold_results:
            return {}
        keep = [a and b for a, b in zip(scorable, scored.gold_valid)]
        verdicts = [r.verdict for r in scored.gold_results]
        out = step_gold_metrics(scored.proxy_scores, scored.gold_scores, verdicts, keep, group_size)
        if "gold/gap" in out:
            self.gaps.append(out["gold/gap"])
            trend = slope(list(self.gaps))
            out |= {} if trend is None else {"gold/gap_slope": trend}
        return out

    def observe(self, evaluation: dict[str, float]) -> bool:
        """Record a held-out evaluation (its gold/proxy_mean_reward, else mean_reward, is the proxy's,
        gold/mean_reward the gold's); True when the stage should stop (reward.stop_on_gold_drop)."""
        if "gold/mean_reward" not in evaluation:
            return False
        self.proxy.append(float(evaluation.get("gold/proxy_mean_reward", evaluation["mean_reward"])))
        self.gold.append(float(evaluation["gold/mean_reward"]))
        return bool(self.stop_after) and gold_drop_streak(self.proxy, self.gold) >= self.stop_after
