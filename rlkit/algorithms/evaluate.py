"""Held-out evaluation: answers from the rollout engine, judged by the recipe's rewards.

Greedy answers (logging.eval_temperature) give accuracy, mean reward, verdict shares, the honesty/calibration
metrics (coverage, wrong-answer rate, selective risk) overall and per task family. With
`logging.eval_samples: n`, n sampled answers per problem also give the unbiased pass@k of Chen et al. (2021)
for each k in `logging.eval_pass_k`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from rlkit.algorithms.episodes import episode_metrics
from rlkit.algorithms.experience import add_env_rewards, check_error_rate, completion_rows, to_samples
from rlkit.recipe import LoggingConfig
from rlkit.data.tasks import Problem
from rlkit.rewards.base import Verdict
from rlkit.rewards.honesty import calibration_metrics


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # logged as eval/<key>
    rows: list[dict]  # one per problem: prompt, gold, greedy completion, reward, verdict


def evaluate(pool, scorer, problems: list[Problem], cfg: LoggingConfig = LoggingConfig(),
             max_error_rate: float = 1.0, max_new_tokens: int | None = None, episodes=None) -> Evaluation:
    """`problems` carry their rendered prompt ids (rlkit.data.prepare); past `max_error_rate` verifier errors it stops.
    With `episodes` (rlkit.algorithms.episodes.EpisodeSampler) each answer is a whole multi-turn episode: its last answer is
    scored, its environment's reward parts added, its transcript tabled and its turns and tool calls measured."""
    prompt_ids = [list(p.prompt_ids) for p in problems]
    if episodes is None:
        groups = pool.generate(prompt_ids, n=1, temperature=cfg.eval_temperature, max_new_tokens=max_new_tokens,
                               seed=0)
    else:
        groups = episodes(problems, 1, cfg.eval_temperature, 0, max_new_tokens)
    completions = [g[0] for g in groups]
    samples = to_samples(problems, [c.text for c in completions])
    scored = scorer.score(samples)
    check_error_rate(scored, max_error_rate, "held-out evaluation")
    if episodes is not None:
        scored = add_env_rewards(scored, completions)
        samples = to_samples(problems, [c.transcript or c.text for c in completions])  # tables show whole episodes
    verdicts = [r.verdict for r in scored.results]
    counts, n = Counter(verdicts), len(problems)
    calibration = calibration_metrics(verdicts)
    metrics = {
        "accuracy": counts[Verdict.CORRECT] / n,
        "mean_reward": sum(scored.scores) / n,
        **{f"verdict/{v.value}": counts[v] / n for v in Verdict if counts[v]},
        **{k: calibration[k] for k in ("coverage", "wrong_rate", "selective_risk")},
        **per_task_metrics([p.task for p in problems], verdicts),
        **gold_metrics(scored),
    }
    if episodes is not None:
        metrics |= episode_metrics(completions)
    if cfg.eval_samples:
        metrics |= sampled_pass_at_k(pool, scorer, problems, prompt_ids, cfg, episodes)
    return Evaluation(metrics, completion_rows(samples, scored))


def gold_metrics(scored) -> dict[str, float]:
    """The gold rewards' (reward.gold: scored, never trained on) accuracy (their first reward's verdict CORRECT)
    and mean over the answers they could score, and the proxy's mean on its own scale (ScoreOutput.proxy); none
    without gold rewards."""
    kept = [r for r in scored.gold_results if r.verdict != Verdict.ERROR]
    if not scored.gold_results:
        return {}
    proxy = scored.proxy_scores
    return {"gold/accuracy": sum(r.verdict == Verdict.CORRECT for r in kept) / len(scored.gold_results),
            "gold/mean_reward": sum(r.score for r in kept) / len(kept) if kept else 0.0,
            "gold/proxy_mean_reward": sum(proxy) / len(proxy)}


def sampled_pass_at_k(pool, scorer, problems: list[Problem], prompt_ids: list[list[int]],
                      cfg: LoggingConfig, episodes=None) -> dict[str, float]:
    """pass@k over `cfg.eval_samples` answers (or episodes) per problem sampled at `cfg.eval_sample_temperature`."""
    n = cfg.eval_samples
    if episodes is None:
        groups = pool.generate(prompt_ids, n=n, temperature=cfg.eval_sample_temperature, seed=1)
    else:
        groups = episodes(problems, n, cfg.eval_sample_temperature, 1)
    scored = scorer.score(to_samples(problems, [c.text for g in groups for c in g], n))
    correct = np.array([r.verdict == Verdict.CORRECT for r in scored.results]).reshape(len(problems), n).sum(1)
    return {f"pass@{k}": float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in cfg.eval_pass_k}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k answers drawn without replacement from n, c of them correct,
    is correct: 1 - C(n-c, k) / C(n, k), computed as a stable product.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 2), pass_at_k(4, 0, 4), pass_at_k(4, 3, 2)
    (0.25, 0.5, 0.0, 1.0)
    """
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def per_task_metrics(tasks: list[str], verdicts: list[Verdict]) -> dict[str, float]:
    """Accuracy, coverage and wrong-answer rate of each labelled task family.

    >>> per_task_metrics(["add", "add", "mul", ""], [Verdict.CORRECT, Verdict.ABSTAIN, Verdict.WRONG, Verdict.WRONG])
    {'task/add/accuracy': 0.5, 'task/add/coverage': 0.5, 'task/add/wrong_rate': 0.0, 'task/mul/accuracy': 0.0, 'task/mul/coverage': 1.0, 'task/mul/wrong_rate': 1.0}
    """
    out: dict[str, float] = {}
    for task in sorted({t for t in tasks if t}):
        metrics = calibration_metrics([v for t, v in zip(tasks, verdicts) if t == task])
        out |= {f"task/{task}/{k}": metrics[k] for k in ("accuracy", "coverage", "wrong_rate")}
    return out


def log_evaluation(logger, evaluation: Evaluation, rows: int, name: str = "") -> dict[str, float]:
    """eval/[name/]* metrics, and the first `rows` completions as the eval/[name/]completions table; returns the
    metrics."""
    prefix = f"eval/{name}/" if name else "eval/"
    logger.log({f"{prefix}{k}": v for k, v in evaluation.metrics.items()})
    if rows:
        logger.table(f"{prefix}completions", evaluation.rows[:rows])
    return evaluation.metrics


def evaluate_sets(pool, scorer, sets: list, logger, cfg: LoggingConfig, max_error_rate: float,
                  episodes=None) -> dict[str, float]:
    """The recipe's further held-out sets (rlkit.data.prepare.EvalSet), each logged under eval/<name>/; returns their
    metrics as <name>/<metric>. Greedy only: pass@k (logging.eval_samples) is the recipe's own set's."""
    greedy = replace(cfg, eval_samples=0)
    metrics = {}
    for s in sets:
        evaluation = evaluate(pool, scorer, s.problems, greedy, max_error_rate, s.max_new_tokens, episodes)
        metrics |= {f"{s.name}/{k}": v for k, v in log_evaluation(logger, evaluation, cfg.table_rows, s.name).items()}
    return metrics
