"""Held-out evaluation: greedy answers from the rollout engine, judged by the recipe's rewards."""

from __future__ import annotations

from collections import Counter

from rlkit.algorithms.common import encode_prompt, to_samples
from rlkit.data import Problem
from rewards.base import Verdict


def evaluate(pool, tokenizer, scorer, problems: list[Problem], temperature: float = 0.0) -> dict[str, float]:
    """accuracy (share judged correct), mean reward, and the share of each verdict."""
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    completions = [g[0] for g in pool.generate(prompt_ids, n=1, temperature=temperature, seed=0)]
    scored = scorer.score(to_samples(problems, [c.text for c in completions]))
    verdicts = Counter(r.verdict for r in scored.results)
    n = len(problems)
    return {
        "accuracy": verdicts[Verdict.CORRECT] / n,
        "mean_reward": sum(scored.scores) / n,
        **{f"verdict/{v.value}": verdicts[v] / n for v in Verdict if verdicts[v]},
    }
