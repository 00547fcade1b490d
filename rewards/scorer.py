"""The scorer: runs the recipe's rewards on batches of samples in killable worker processes (`rlkit.rewards.pool`).

Each sample gets a hard deadline (`reward.timeout_s`): past it, the worker running it is killed and replaced,
and the sample's verdict is TIMEOUT (math-verify's own alarm cannot stop every pathological input, e.g. a huge
integer power computed in C). A reward that raises gives ERROR. Neither is a silent 0; they differ in whose
fault they are:
- TIMEOUT is the model's: an answer that keeps a verifier past its deadline (a power tower, a huge factorial,
  thousands of nested braces) is a wrong answer. It scores the reward's `wrong` value (0.0 if it has none),
  stays in the loss, and is counted in `stats["timeouts"]`; `reward.on_error` does not apply to it.
- ERROR is the verifier's (it raised, or its worker died): counted in `stats["errors"]` and handled by
  `reward.on_error`: "exclude" the sample from the loss, "score" it `error_score`, or "fail" the run. So
  "fail" stops on verifier errors only, never on a model's timeout.

A batched reward (one with `score_batch(samples, engine)`, e.g. the LLM judge in `rlkit.rewards.judge`) runs here in
the scorer's process, once per batch, never in the workers (each would load its own model). If it has
`engine_args()`, the scorer makes its engine at start, `make_engine(*reward.engine_args())`: a VllmRollout in
this process by default, a Ray actor from rlkit.runtime.cluster on a Ray cluster (else `engine` is None). It is not
under the per-sample deadline; its faults come back as ERROR results all the same, and an exception escaping
it makes every sample of the batch an ERROR.

Gold rewards (`ScorerConfig.gold`, the recipe's `reward.gold`) run beside the trained ones on the same samples and
workers but never enter a sample's score, verdict or validity: each sample gets a `gold_results` entry (their
weighted sum, the first gold reward's verdict), so a stage can watch a proxy reward (e.g. a trained reward model)
against a verifier it does not train on (rlkit.algorithms.gold). A gold reward's ERROR leaves the trained sample
alone; it is counted (`stats["gold/errors"]`), left out of the gold statistics, and stops the run under
on_error "fail" as any verifier error does.

The scorer takes its own `ScorerConfig` (rlkit builds one from the recipe's `reward` section); a reward that
cannot be built, or a deadline its rewards cannot meet, fails construction with RewardConfigError.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.pool import Outcome, WorkerPool
from rlkit.rewards.registry import RewardConfigError, RewardSpec, build_reward, resolve_spec, reward_label


@dataclass(frozen=True)
class ScorerConfig:
    """The rewards and how to run them. The defaults equal the recipe's `reward` section, which rlkit turns into
    this (rlkit.runtime.scoring.scorer_config; tests/cli/test_score.py checks that the defaults agree)."""

    rewards: Sequence[RewardSpec] = (RewardSpec(name="math"),)  # the first one's verdict is a sample's verdict
    num_workers: int = 2  # worker processes that run the per-sample rewards
    timeout_s: float = 5.0  # hard deadline per sample; the worker is killed and replaced past it
    on_error: str = "fail"  # what a verifier error does: "exclude" the sample, "score" it error_score, "fail"
    error_score: float = 0.0
    gold: Sequence[RewardSpec] = ()  # scored on every sample beside `rewards`, never part of its score


class RewardError(RuntimeError):
    """A reward failed on a sample and `reward.on_error` is "fail"."""


@dataclass(frozen=True)
class ScoreOutput:
    scores: list[float]  # (N,) weighted sum of the rewards, per sample
    results: list[RewardResult]  # (N,) combined: the first reward's verdict, every reward's score by name
    valid: list[bool]  # (N,) False where on_error="exclude" dropped the sample
    stats: dict[str, float] = field(default_factory=dict)
    # (N,) the gold rewards combined: weighted sum, the first gold reward's verdict (ERROR if any gold reward
    # erred), each gold reward's score by name; empty without gold rewards
    gold_results: list[RewardResult] = field(default_factory=list)
    # (N,) with gold rewards: the weighted sum of the rewards each on its own scale (a reward's `raw` component where
    # it has one, as a model reward normalised per batch has), the proxy the gold monitor sets against gold
    proxy: list[float] = field(default_factory=list)

    @property
    def proxy_scores(self) -> list[float]:
        """(N,) what the gold monitor sets against gold: `proxy`, or the scores where no proxy was kept."""
        return self.proxy or self.scores

    @property
    def gold_scores(self) -> list[float]:
        return [r.score for r in self.gold_results]  # (N,)

    @property
    def gold_valid(self) -> list[bool]:
        return [r.verdict != Verdict.ERROR for r in self.gold_results]  # (N,) False: a gold reward erred


def _check_budget(rewards: list, timeout_s: float) -> None:
    """A reward with its own time limit (`budget_s`, e.g. the code sandbox) must finish inside the deadline:
    running out of its own time is the solution's fault (wrong), the scorer's deadline a verifier fault."""
    budgets = [float(getattr(r, "budget_s", 0.0) or 0.0) for r in rewards]
    if sum(budgets) >= timeout_s:
        i = max(range(len(budgets)), key=budgets.__getitem__)
        raise RewardConfigError(f"reward.rewards[{i}]: may take up to {budgets[i]:g}s per sample (its own limit; the "
                                f"rewards together {sum(budgets):g}s) but reward.timeout_s is {timeout_s:g}; raise "
                                "reward.timeout_s above that or lower the reward's limit (e.g. kwargs: {wall_s: ...})")


def own_scale(result: RewardResult) -> float:
    """A reward's score on its own scale: its `raw` component where it has one (a model reward's score before
    per-batch normalisation and clipping), else its score.

    >>> own_scale(RewardResult(0.5, Verdict.CORRECT, {"raw": 2.5})), own_scale(RewardResult(1.0, Verdict.CORRECT))
    (2.5, 1.0)
    """
    raw = result.components.get("raw")
    return float(raw) if raw is not None else result.score


def is_batched(reward) -> bool:
    """Whether the scorer runs `reward` over whole batches in its own process (see the module docstring)."""
    return callable(getattr(reward, "score_batch", None))


def _local_engine(*args):
    from rlkit.rollout.vllm_engine import VllmRollout  # torch and vLLM load only where a reward needs an engine

    return VllmRollout(*args)


def _start_engine(make_engine: Callable, reward, k: int):
    try:
        return make_engine(*reward.engine_args())
    except Exception as e:
        raise RuntimeError(f"reward.rewards[{k}]: its engine failed to start ({type(e).__name__}: {e})") from e


class Scorer:
    """Scores samples with the recipe's weighted rewards; see the module docstring for deadlines and errors."""

    def __init__(self, cfg: ScorerConfig, make_engine: Callable | None = None):
        self.cfg = cfg
        self.trained = len(cfg.rewards)  # specs[:trained] make the score, specs[trained:] are the gold ones
        self.specs = list(cfg.rewards) + list(cfg.gold)
        # Fail fast, in this process, on a bad name, import path or kwargs, or a deadline too short to be met.
        self._rewards = [build_reward(spec, i) for i, spec in enumerate(cfg.rewards)]  # for their summaries
        self._rewards += [build_reward(spec, i, "gold") for i, spec in enumerate(cfg.gold)]
        self._batched = [k for k, r in enumerate(self._rewards) if is_batched(r)]
        self._pooled = [k for k in range(len(self.specs)) if k not in self._batched]
        _check_budget(self._rewards, cfg.timeout_s)
        self.labels = [reward_label(s) for s in self.specs[:self.trained]]
        self.gold_labels = [reward_label(s) for s in self.specs[self.trained:]]
        self._engines: dict[int, object] = {}
        self._pool = None
        if self._pooled:
            self._pool = WorkerPool([resolve_spec(self.specs[k]) for k in self._pooled], cfg.num_workers, cfg.timeout_s)
        try:
            for k in self._batched:
                if callable(getattr(self._rewards[k], "engine_args", None)):  # else it needs no engine
                    self._engines[k] = _start_engine(make_engine or _local_engine, self._rewards[k], k)
        except BaseException:
            self.close()
            raise

    def score(self, samples: list[Sample]) -> ScoreOutput:
        """Scores for `samples` (N,), in order; raises RewardError on a fault when on_error is "fail"."""
        samples = list(samples)
        return self.combine(samples, self.outcomes(samples))

    def outcomes(self, samples: list[Sample]) -> list[Outcome]:
        """Every reward's result on each of `samples` (N,), in order, not yet combined: what each of several scorers
        computes on its share of a batch (rlkit.runtime.scoring.ScorerGroup); never raises on a reward's fault."""
        samples = list(samples)
        pooled = self._pool.run(samples) if self._pool is not None else [[] for _ in samples]
        batched = {k: self._score_batch(k, samples) for k in self._batched}
        per_sample = []
        for i, outs in enumerate(pooled):  # back to the recipe's order of rewards
            rest = iter(outs)
            outs = [batched[k][i] if k in batched else next(rest) for k in range(len(self.specs))]
            per_sample.append([self._timeout_as_wrong(k, r) for k, r in enumerate(outs)])
        return per_sample

    def combine(self, samples: list[Sample], *shares: list[Outcome]) -> ScoreOutput:
        """The ScoreOutput of `samples` (N,) from the `outcomes` of its consecutive shares, in order: scores, the
        reward policy (on_error) and the stats over the whole batch, as `score` gives them."""
        per_sample = [outcome for share in shares for outcome in share]
        if len(per_sample) != len(samples):
            raise ValueError(f"combine: {len(per_sample)} outcomes for {len(samples)} samples")
        return self._combine(list(samples), per_sample)

    def _timeout_as_wrong(self, k: int, result: RewardResult) -> RewardResult:
        """A TIMEOUT keeps its verdict (counted, logged) but scores as reward k's wrong answer."""
        if result.verdict != Verdict.TIMEOUT:
            return result
        wrong = float(getattr(self._rewards[k], "wrong", 0.0))
        return RewardResult(wrong, Verdict.TIMEOUT, result.components, result.info)

    def _score_batch(self, k: int, samples: list[Sample]) -> list[RewardResult]:
        """Reward k's results on the whole batch; anything escaping it makes every sample an ERROR."""
        try:
            results = self._rewards[k].score_batch(samples, self._engines.get(k))
            if len(results) != len(samples) or not all(isinstance(r, RewardResult) for r in results):
                raise TypeError(f"score_batch() returned {len(results)} items for {len(samples)} samples, "
                                "expected one RewardResult each")
            return list(results)
        except Exception as e:
            error = RewardResult(0.0, Verdict.ERROR, info={"error": f"{type(e).__name__}: {e}"[:1000]})
            return [error] * len(samples)

    def _combine(self, samples: list[Sample], per_sample: list[Outcome]) -> ScoreOutput:
        per_gold = [outs[self.trained:] for outs in per_sample]
        per_sample = [outs[:self.trained] for outs in per_sample]
        scores, results, valid = [], [], []
        gold = [self._combine_gold(samples, i, outs) for i, outs in enumerate(per_gold)] if self.gold_labels else []
        for index, outs in enumerate(per_sample):
            components = {label: r.score for label, r in zip(self.labels, outs)}
            total = sum(spec.weight * r.score for spec, r in zip(self.specs, outs))
            verdict, ok = outs[0].verdict, True  # the first reward is the primary one
            if any(r.verdict == Verdict.TIMEOUT for r in outs):
                verdict = Verdict.TIMEOUT  # a wrong answer for the loss, a timeout for the counts
            fault = next(((label, r) for label, r in zip(self.labels, outs) if r.verdict == Verdict.ERROR), None)
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
        stats = self._stats(per_sample, results, valid) | self._gold_stats(per_gold, gold)
        proxy = [float(sum(spec.weight * own_scale(r) for spec, r in zip(self.specs, outs))) for outs in per_sample]
        return ScoreOutput(scores, results, valid, stats, gold, proxy if gold else [])

    def _combine_gold(self, samples: list[Sample], index: int, outs: list[RewardResult]) -> RewardResult:
        """A sample's gold rewards as one result; an error in any of them makes it an ERROR (left out of the gold
        statistics, never of the trained sample), or stops the run under on_error "fail"."""
        specs = self.specs[self.trained:]
        components = {label: r.score for label, r in zip(self.gold_labels, outs)}
        info = {label: r.info for label, r in zip(self.gold_labels, outs)}
        fault = next(((label, r) for label, r in zip(self.gold_labels, outs) if r.verdict == Verdict.ERROR), None)
        if fault is None:
            total = sum(spec.weight * r.score for spec, r in zip(specs, outs))
            return RewardResult(float(total), outs[0].verdict, components, info)
        label, bad = fault
        if self.cfg.on_error == "fail":
            raise RewardError(f"gold reward '{label}' gave {bad.verdict.value} on sample {index} "
                              f"(prompt {samples[index].prompt[:80]!r}): {bad.info.get('error')}; "
                              "set reward.on_error to 'exclude' or 'score' to continue past such samples")
        return RewardResult(0.0, Verdict.ERROR, components, info)

    def _gold_stats(self, per_gold: list[Outcome], gold: list[RewardResult]) -> dict[str, float]:
        """Each gold reward's mean over the samples where it did not err, and the gold errors."""
        if not gold:
            return {}
        stats = {"gold/errors": float(sum(r.verdict == Verdict.ERROR for r in gold))}
        for k, label in enumerate(self.gold_labels):
            values = [outs[k].score for outs in per_gold if outs[k].verdict != Verdict.ERROR]
            stats[f"gold/{label}/mean"] = statistics.fmean(values) if values else 0.0
        return stats

    def _stats(self, per_sample: list[Outcome], results: list[RewardResult], valid: list[bool]) -> dict[str, float]:
        """Per-component mean/std over the samples where that reward did not err, each reward's own summary
        (`summarize(verdicts)`, if it has one), verdict and fault counts."""
        stats: dict[str, float] = {}
        kept = [r.score for r, ok in zip(results, valid) if ok]
        stats["score/mean"] = statistics.fmean(kept) if kept else 0.0
        for k, label in enumerate(self.labels):
            values = [outs[k].score for outs in per_sample if outs[k].verdict != Verdict.ERROR]
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
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        for engine in self._engines.values():
            engine.close()
        self._engines = {}

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
