"""The scorer: runs the recipe's rewards on batches of samples in killable worker processes.

Each sample gets a hard deadline (`reward.timeout_s`): past it, the worker running it is killed and replaced,
and the sample's verdict is TIMEOUT (math-verify's own timeout cannot stop every pathological input). A reward
that raises gives ERROR. Neither is a silent 0: both are counted in the stats and handled by
`reward.on_error` ("exclude" the sample from the loss, "score" it `error_score`, or "fail" the run).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from rlkit.config import RewardConfig, RewardSpec
from rewards.base import RewardResult, Sample, Verdict
from rewards.registry import build_reward, reward_label

_FAULTS = (Verdict.ERROR, Verdict.TIMEOUT)


class RewardError(RuntimeError):
    """A reward failed on a sample and `reward.on_error` is "fail"."""


@dataclass(frozen=True)
class ScoreOutput:
    scores: list[float]  # (N,) weighted sum of the rewards, per sample
    results: list[RewardResult]  # (N,) combined: the first reward's verdict, every reward's score by name
    valid: list[bool]  # (N,) False where on_error="exclude" dropped the sample
    stats: dict[str, float] = field(default_factory=dict)


def _serve(conn, specs: list[RewardSpec]) -> None:
    """Worker loop: score one sample per message with every reward; exceptions become ERROR results."""
    rewards = [build_reward(spec, i) for i, spec in enumerate(specs)]
    conn.send("ready")
    while True:
        message = conn.recv()
        if message is None:
            return
        index, sample = message
        out = []
        for reward in rewards:
            try:
                result = reward.score(sample)
                if not isinstance(result, RewardResult):
                    raise TypeError(f"score() returned {type(result).__name__}, expected RewardResult")
            except Exception as e:  # reported to the parent, never swallowed
                result = RewardResult(0.0, Verdict.ERROR, info={"error": f"{type(e).__name__}: {e}"})
            out.append(result)
        conn.send((index, out))


class _Worker:
    def __init__(self, ctx, specs: list[RewardSpec]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, specs), daemon=True)
        self.process.start()
        child.close()
        try:
            started = self.conn.poll(120) and self.conn.recv() == "ready"
        except (EOFError, OSError):
            started = False
        if not started:
            self.kill()
            raise RuntimeError(f"a reward worker failed to start (exit code {self.process.exitcode})")

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class Scorer:
    """Scores samples with the recipe's weighted rewards; see the module docstring for deadlines and errors."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.specs = list(cfg.rewards)
        for i, spec in enumerate(self.specs):  # fail fast, in this process, on a bad name or import path
            build_reward(spec, i)
        self.labels = [reward_label(s) for s in self.specs]
        self._ctx = mp.get_context("spawn")  # no fork: the parent may hold threads and a vLLM engine
        self._workers = [_Worker(self._ctx, self.specs) for _ in range(cfg.num_workers)]

    def score(self, samples: list[Sample]) -> ScoreOutput:
        per_sample = self._run(samples)
        return self._combine(samples, per_sample)

    def _run(self, samples: list[Sample]) -> list[list[RewardResult]]:
        """Every reward's result per sample, spreading samples over the workers one at a time."""
        results: list[list[RewardResult] | None] = [None] * len(samples)
        pending = deque(range(len(samples)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (sample index, deadline)
        while pending or busy:
            for slot in range(len(self._workers)):
                if slot not in busy and pending:
                    index = pending.popleft()
                    self._workers[slot].conn.send((index, samples[index]))
                    busy[slot] = (index, time.monotonic() + self.cfg.timeout_s)
            first_deadline = min(deadline for _, deadline in busy.values())
            ready = wait([self._workers[s].conn for s in busy], timeout=max(0.0, first_deadline - time.monotonic()))
            for slot in list(busy):
                worker = self._workers[slot]
                index, deadline = busy[slot]
                if worker.conn in ready:
                    try:
                        got_index, out = worker.conn.recv()
                        assert got_index == index
                        results[index] = out
                    except (EOFError, OSError):  # the worker died (e.g. a reward called os._exit)
                        results[index] = self._fault(Verdict.ERROR, "reward worker died")
                        self._replace(slot)
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    results[index] = self._fault(Verdict.TIMEOUT, f"no result within {self.cfg.timeout_s}s")
                    self._replace(slot)
                    del busy[slot]
        return results  # type: ignore[return-value]

    def _fault(self, verdict: Verdict, message: str) -> list[RewardResult]:
        return [RewardResult(0.0, verdict, info={"error": message}) for _ in self.specs]

    def _replace(self, slot: int) -> None:
        self._workers[slot].kill()
        self._workers[slot] = _Worker(self._ctx, self.specs)

    def _combine(self, samples: list[Sample], per_sample: list[list[RewardResult]]) -> ScoreOutput:
        scores, results, valid = [], [], []
        faults = Counter()
        for index, outs in enumerate(per_sample):
            components = {label: r.score for label, r in zip(self.labels, outs)}
            total = sum(spec.weight * r.score for spec, r in zip(self.specs, outs))
            verdict, ok = outs[0].verdict, True
            fault = next(((label, r) for label, r in zip(self.labels, outs) if r.verdict in _FAULTS), None)
            if fault is not None:
                label, bad = fault
                faults[bad.verdict.value] += 1
                verdict = bad.verdict
                if self.cfg.on_error == "fail":
                    raise RewardError(
                        f"reward '{label}' gave {bad.verdict.value} on sample {index} "
                        f"(prompt {samples[index].prompt[:80]!r}): {bad.info.get('error')}; "
                        "set reward.on_error to 'exclude' or 'score' to continue past such samples"
                    )
                if self.cfg.on_error == "exclude":
                    total, ok = 0.0, False
                else:
                    total = self.cfg.error_score
            scores.append(float(total))
            valid.append(ok)
            results.append(RewardResult(float(total), verdict, components, {l: r.info for l, r in zip(self.labels, outs)}))
        return ScoreOutput(scores, results, valid, self._stats(results, valid, faults))

    def _stats(self, results: list[RewardResult], valid: list[bool], faults: Counter) -> dict[str, float]:
        stats: dict[str, float] = {}
        for label in self.labels:
            values = [r.components[label] for r in results]
            stats[f"{label}/mean"] = statistics.fmean(values) if values else 0.0
            stats[f"{label}/std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
        for verdict, count in Counter(r.verdict.value for r in results).items():
            stats[f"verdict/{verdict}"] = float(count)
        stats["errors"] = float(faults["error"])
        stats["timeouts"] = float(faults["timeout"])
        stats["excluded"] = float(len(valid) - sum(valid))
        return stats

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            worker.kill()
        self._workers = []

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
