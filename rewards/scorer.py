"""The scorer: runs the recipe's rewards on batches of samples in killable worker processes (`rewards.pool`).

Each sample gets a hard deadline (`reward.timeout_s`): past it, the worker running it is killed and replaced,
and the sample's verdict is TIMEOUT (math-verify's own alarm cannot stop every pathological input, e.g. a huge
integer power computed in C). A reward that raises gives ERROR. Neither is a silent 0: both are counted in the
stats and handled by `reward.on_error` ("exclude" the sample from the loss, "score" it `error_score`, or
"fail" the run).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from rlkit.config import RecipeError, RewardConfig
from rewards.base import RewardResult, Sample, Verdict
from rewards.pool import Outcome, WorkerPool
from rewards.registry import build_reward, resolve_spec, reward_label

_FAULTS = (Verdict.ERROR, Verdict.TIMEOUT)


class RewardError(RuntimeError):
    """A reward failed on a sample and `reward.on_error` is "fail"."""


@dataclass(frozen=True)
class ScoreOutput:
    scores: list[float]  # (N,) weighted sum of the rewards, per sample
    results: list[RewardResult]  # (N,) combined: the first reward's verdict, every reward's score by name
    valid: list[bool]  # (N,) False where on_error="exclude" dropped the sample
    stats: dict[str, float] = field(default_factory=dict)


def _check_budget(rewards: list, timeout_s: float) -> None:
    """A reward with its own time limit (`budget_s`, e.g. the code sandbox) must finish inside the deadline:
    running out of its own time is the solution's fault (wrong), the scorer's deadline a verifier fault."""
    budgets = [float(getattr(r, "budget_s", 0.0) or 0.0) for r in rewards]
    if sum(budgets) >= timeout_s:
        i = max(range(len(budgets)), key=budgets.__getitem__)
        raise RecipeError(f"reward.rewards[{i}]: may take up to {budgets[i]:g}s per sample (its own limit; the rewards "
                          f"together {sum(budgets):g}s) but reward.timeout_s is {timeout_s:g}; raise reward.timeout_s "
                          "above that or lower the reward's limit (e.g. kwargs: {wall_s: ...})")


class Scorer:
    """Scores samples with the recipe's weighted rewards; see the module docstring for deadlines and errors."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.specs = list(cfg.rewards)
        # Fail fast, in this process, on a bad name, import path or kwargs, or a deadline too short to be met.
        self._rewards = [build_reward(spec, i) for i, spec in enumerate(self.specs)]  # for their summaries
        _check_budget(self._rewards, cfg.timeout_s)
        self.labels = [reward_label(s) for s in self.specs]
        self._pool = WorkerPool([resolve_spec(s) for s in self.specs], cfg.num_workers, cfg.timeout_s)

    def score(self, samples: list[Sample]) -> ScoreOutput:
        """Scores for `samples` (N,), in order; raises RewardError on a fault when on_error is "fail"."""
        return self._combine(samples, self._pool.run(list(samples)))

    def _combine(self, samples: list[Sample], per_sample: list[Outcome]) -> ScoreOutput:
        scores, results, valid = [], [], []
        for index, outs in enumerate(per_sample):
            components = {label: r.score for label, r in zip(self.labels, outs)}
            total = sum(spec.weight * r.score for spec, r in zip(self.specs, outs))
            verdict, ok = outs[0].verdict, True  # the first reward is the primary one
            fault = next(((label, r) for label, r in zip(self.labels, outs) if r.verdict in _FAULTS), None)
            if fault is not None:
                label, bad = fault
                verdict = bad.verdict  # a fault in any reward makes the whole sample a fault
                if self.cfg.on_error == "fail":
                    raise RewardError(
                        f"reward '{label}' gave {bad.verdict.value} on sample {index} "
                        f"(prompt {samples[index].prompt[:80]!r}): {bad.info.get('error')}; "
                        "set reward.on_error to 'exclude' or 'score' to continue past such samples"
                    )
                total, ok = (0.0, False) if self.cfg.on_error == "exclude" else (self.cfg.error_score, True)
            scores.append(float(total))
            valid.append(ok)
            info = {label: r.info for label, r in zip(self.labels, outs)}
            results.append(RewardResult(float(total), verdict, components, info))
        return ScoreOutput(scores, results, valid, self._stats(per_sample, results, valid))

    def _stats(self, per_sample: list[Outcome], results: list[RewardResult], valid: list[bool]) -> dict[str, float]:
        """Per-component mean/std over the samples where that reward did not fault, each reward's own summary
        (`summarize(verdicts)`, if it has one), verdict and fault counts."""
        stats: dict[str, float] = {}
        kept = [r.score for r, ok in zip(results, valid) if ok]
        stats["score/mean"] = statistics.fmean(kept) if kept else 0.0
        for k, label in enumerate(self.labels):
            values = [outs[k].score for outs in per_sample if outs[k].verdict not in _FAULTS]
            stats[f"{label}/mean"] = statistics.fmean(values) if values else 0.0
            stats[f"{label}/std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        for k, (label, reward) in enumerate(zip(self.labels, self._rewards)):
            if callable(getattr(reward, "summarize", None)):  # e.g. the honesty reward's calibration metrics
                summary = reward.summarize([outs[k].verdict for outs in per_sample])
                stats.update({f"{label}/{name}": float(value) for name, value in summary.items()})
        verdicts = Counter(r.verdict.value for r in results)
        for verdict, count in sorted(verdicts.items()):
            stats[f"verdict/{verdict}"] = float(count)
        stats["errors"] = float(verdicts[Verdict.ERROR.value])
        stats["timeouts"] = float(verdicts[Verdict.TIMEOUT.value])
        stats["excluded"] = float(len(valid) - sum(valid))
        return stats

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
