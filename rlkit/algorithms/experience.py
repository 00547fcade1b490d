"""Experience: what sampling makes and every sampling stage consumes (GRPO, PPO, RFT, distillation, online DPO
and DPO's policy pairs).

One producer, `ExperienceMaker.make`, turns a batch of prompts into an `Experience`: B prompts x G samples in an
explicit (B, G) layout (prompt-major), the sampled token ids, the engine's log-probs of them, the rewards with their
verdicts, and the policy version whose weights sampled them. DAPO's dynamic sampling draws its extra prompt batches
here too (`ExperienceMaker.make_groups`).

`ExperienceSource` hands a step loop its experience. With `rollout.max_staleness: 0` a batch is sampled when the
loop asks for it, from the weights of the last update (on-policy, strictly alternating). With N >= 1 a thread samples
the next batches while the trainer updates, so generation and training overlap; batch k is sampled only once the
engines hold policy version k - N or later, so no batch is trained on more than N versions after the weights that
sampled it. Weight syncs and evaluations take the same engine lock as sampling, so they happen between engine
requests and never drop a sample in flight.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from rlkit.algorithms.advantages import uniform_groups
from rlkit.data.tasks import BatchSampler, Problem
from rlkit.training.batches import TokenBatch, pack_sequences
from rlkit.rewards.base import Sample
from rlkit.rewards.scorer import ScoreOutput
from rlkit.rollout.generations import token_list


@dataclass(frozen=True)
class Experience:
    """B prompts x G samples, prompt-major: sample j of prompt i is row i * G + j of every per-sample field."""

    problems: list[Problem]  # (B,)
    prompt_ids: list[list[int]]  # (B,) rendered prompts
    completions: list  # (B*G,) rlkit.rollout.generations.Completion, or rlkit.algorithms.episodes.Episode (loss_mask: env tokens are 0)
    scored: ScoreOutput  # (B*G,) the recipe's rewards on each completion's text
    group_size: int  # G
    version: int = 0  # policy version (updates applied) of the weights that sampled it
    rounds: int = 1  # prompt batches drawn for it (DAPO dynamic sampling)
    sampler_position: int = 0  # the prompt sampler's position after drawing it (resume continues there)

    @property
    def batch_size(self) -> int:
        return len(self.prompt_ids)

    def group(self, i: int) -> slice:
        """Rows of prompt i's samples."""
        return slice(i * self.group_size, (i + 1) * self.group_size)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor(self.scored.scores, dtype=torch.float32)  # (B*G,)

    @property
    def scorable(self) -> torch.Tensor:
        return torch.tensor(self.scored.valid, dtype=torch.bool)  # (B*G,) False: excluded by reward.on_error

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(c.token_ids) for c in self.completions])  # (B*G,)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]

    def samples(self) -> list[Sample]:
        """What the rewards scored: each completion's text (an episode's last answer)."""
        return to_samples(self.problems, self.texts, self.group_size)

    def table_samples(self) -> list[Sample]:
        """What a completions table shows: the completion, or an episode's whole transcript."""
        texts = [getattr(c, "transcript", "") or c.text for c in self.completions]
        return to_samples(self.problems, texts, self.group_size)

    def repeated_prompts(self) -> list[list[int]]:
        """(B*G,) each row's prompt: its problem's, or the one an environment opened the episode with."""
        return [list(getattr(c, "prompt_ids", ()) or p) for c, p in zip(
            self.completions, (p for p in self.prompt_ids for _ in range(self.group_size)))]

    def token_batch(self, pad_id: int) -> TokenBatch:
        """Prompt + completion rows (B*G, L); the response mask is 0 on environment tokens (tool output), which the
        policy did not sample and the loss must not train on."""
        prompts = self.repeated_prompts()
        tokens = pack_sequences(prompts, [token_list(c.token_ids) for c in self.completions], pad_id)
        if not any(getattr(c, "loss_mask", None) is not None for c in self.completions):
            return tokens
        mask = tokens.response_mask.clone()
        for i, (prompt, c) in enumerate(zip(prompts, self.completions)):
            if getattr(c, "loss_mask", None) is not None:
                start = len(prompt) - 1
                mask[i, start : start + len(c.loss_mask)] = torch.tensor(c.loss_mask, dtype=mask.dtype)
        return replace(tokens, response_mask=mask)

    def rollout_logprobs(self, width: int) -> torch.Tensor:
        """The engine's log-probs placed on the trainer's target grid (B*G, width), zero off the response."""
        out = torch.zeros(len(self.completions), width)
        for i, (c, prompt) in enumerate(zip(self.completions, self.repeated_prompts())):
            out[i, len(prompt) - 1 : len(prompt) - 1 + len(c.logprobs)] = torch.as_tensor(c.logprobs)
        return out


def to_samples(problems: list[Problem], texts: list[str], repeat: int = 1) -> list[Sample]:
    """Pair each completion with its problem; completions come `repeat` per problem, in order."""
    return [
        Sample(prompt=p.prompt, completion=texts[i * repeat + j], gold=p.answer, task=p.task)
        for i, p in enumerate(problems)
        for j in range(repeat)
    ]


def completion_rows(samples: list[Sample], scored: ScoreOutput) -> list[dict]:
    """Table rows for samples and their ScoreOutput (matched by position; `samples` may be a prefix)."""
    return [
        {"prompt": s.prompt, "gold": s.gold, "completion": s.completion, "reward": score,
         "verdict": result.verdict.value}
        for s, score, result in zip(samples, scored.scores, scored.results)
    ]


class RewardFailure(RuntimeError):
    """The rewards failed on too many samples of a batch (reward.max_error_rate): the reward is broken."""


def check_error_rate(scored: ScoreOutput, max_rate: float, where: str) -> None:
    """Stop when the share of samples the rewards failed on (verifier errors, not wrong answers or a model's
    timeouts) passes `max_rate`, whatever reward.on_error does with each of them."""
    n = len(scored.scores)
    for key, which in (("errors", "rewards"), ("gold/errors", "gold rewards (reward.gold)")):
        errors = scored.stats.get(key, 0.0)
        if n and errors / n > max_rate:
            raise RewardFailure(
                f"{where}: the {which} failed on {int(errors)} of {n} samples, above reward.max_error_rate="
                f"{max_rate}; check the reward on a file of samples with python -m rlkit.score (its --output shows "
                "each error)")


class ExperienceMaker:
    """Samples from a rollout pool and scores with the recipe's rewards. `episodes(problems, n, temperature, seed)
    -> [problem][sample]` replaces single-turn sampling by multi-turn episodes (rlkit.algorithms.episodes.run_episodes over the
    same pool); an episode's reward is the recipe's rewards on its last answer plus its environment's parts."""

    def __init__(self, pool, scorer, max_error_rate: float, where: str, lock: threading.Lock | None = None,
                 episodes: Callable | None = None):
        """`lock` is held while the engines sample and the rewards score (StageContext.engine_lock: syncs and
        evaluations take it too)."""
        self.pool, self.scorer, self.max_error_rate, self.where = pool, scorer, max_error_rate, where
        self.lock = lock or threading.Lock()
        self.episodes = episodes
        self.seconds: dict[str, float] = {}  # generate / score time since the last `take_seconds`

    def make(self, problems: list[Problem], n: int, temperature: float, seed: int, version: int = 0) -> Experience:
        """n samples per prompt from the pool's current weights, each scored by the rewards."""
        prompt_ids = [list(p.prompt_ids) for p in problems]  # rendered once, when the data was prepared
        with self.lock:  # the scorer too: an evaluation in the loop's thread uses it under the same lock
            t0 = time.perf_counter()
            if self.episodes is None:
                groups = self.pool.generate(prompt_ids, n=n, temperature=temperature, seed=seed)
            else:
                groups = self.episodes(problems, n, temperature, seed)
            t1 = time.perf_counter()
            completions = [c for g in groups for c in g]
            scored = self.scorer.score(to_samples(problems, [c.text for c in completions], n))
        self._add("generate", t1 - t0)
        self._add("score", time.perf_counter() - t1)
        check_error_rate(scored, self.max_error_rate, self.where)
        if self.episodes is not None:
            scored = add_env_rewards(scored, completions)
        return Experience(problems, prompt_ids, completions, scored, n, version)

    def make_groups(self, sampler: BatchSampler, n: int, temperature: float, seed: int, rounds: int,
                    version: int = 0) -> Experience:
        """A batch of prompt groups. With `rounds` > 1 (DAPO's dynamic sampling) up to that many prompt batches are
        drawn until the sampler's batch size of groups whose rewards differ is found; short of that, the first
        batch's uniform groups fill the rest (and leave the loss as before)."""
        drawn: list[tuple[Experience, list[bool]]] = []
        for r in range(rounds):
            exp = self.make(sampler.next(), n, temperature, seed + 100_003 * r, version)
            uniform = uniform_groups(exp.rewards, n, exp.scorable)[::n].tolist()  # (B,)
            drawn.append((exp, uniform))
            if sum(not u for _, flags in drawn for u in flags) >= exp.batch_size:
                break
        if len(drawn) == 1:
            return replace(drawn[0][0], sampler_position=sampler.position)
        picked = pick_groups([flags for _, flags in drawn], drawn[0][0].batch_size)
        rows = [(drawn[r][0], g * n + j) for r, g in picked for j in range(n)]  # (experience, row) of each sample
        first = drawn[0][0].scored
        scored = ScoreOutput(scores=[e.scored.scores[i] for e, i in rows],
                             results=[e.scored.results[i] for e, i in rows],
                             valid=[e.scored.valid[i] for e, i in rows], stats=first.stats,
                             gold_results=[e.scored.gold_results[i] for e, i in rows] if first.gold_results else [],
                             proxy=[e.scored.proxy[i] for e, i in rows] if first.proxy else [])
        return Experience([drawn[r][0].problems[g] for r, g in picked], [drawn[r][0].prompt_ids[g] for r, g in picked],
                          [e.completions[i] for e, i in rows], scored, n, version, len(drawn), sampler.position)

    def _add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def take_seconds(self) -> dict[str, float]:
        """Phase times since the last call (the step's, on-policy; the batches sampled meanwhile, asynchronous)."""
        out, self.seconds = self.seconds, {}
        return out


def add_env_rewards(scored: ScoreOutput, episodes: list) -> ScoreOutput:
    """Each episode's environment reward parts added to its score and to its proxy (an excluded sample keeps its
    placeholder), their means logged as reward/env/<part>."""
    parts = [dict(getattr(e, "reward_parts", {}) or {}) for e in episodes]
    added = [sum(p.values()) if ok else 0.0 for p, ok in zip(parts, scored.valid)]  # (N,)
    names = sorted({k for p in parts for k in p})
    stats = dict(scored.stats) | {f"env/{k}": sum(p.get(k, 0.0) for p in parts) / max(len(parts), 1) for k in names}
    return replace(scored, scores=[s + a for s, a in zip(scored.scores, added)],
                   proxy=[s + a for s, a in zip(scored.proxy, added)], stats=stats)


def pick_groups(uniform: list[list[bool]], batch: int) -> list[tuple[int, int]]:
    """(round, group) pairs forming a batch: groups with a signal in the order sampled, topped up with the first
    round's uniform groups when fewer than `batch` were found.

    >>> pick_groups([[True, False, True], [False, False, True]], 3)
    [(0, 1), (1, 0), (1, 1)]
    >>> pick_groups([[True, False], [True, True]], 2)
    [(0, 1), (0, 0)]
    """
    informative = [(r, g) for r, flags in enumerate(uniform) for g, same in enumerate(flags) if not same]
    filler = [(0, g) for g, same in enumerate(uniform[0]) if same]
    return (informative + filler)[:batch]


class ExperienceSource:
    """Experience for the steps of a loop until `end`: `get(step)` returns step's batch, made by `produce(step,
    version)` on-policy (max_staleness 0) or ahead of the loop by a thread (N >= 1) that starts at the first `get`
    (after a resume has restored the prompt sampler). After every weight sync the loop calls `synced()`: the
    engines then hold one more policy version. Weight syncs wait for the engine lock (ExperienceMaker), so they land
    between the thread's engine requests.
    """

    def __init__(self, produce: Callable[[int, int], Experience], end: int, max_staleness: int):
        self.produce, self.end, self.max_staleness = produce, end, max_staleness
        self.version = 0  # policy version the engines hold: updates applied (a resumed loop starts at its step)
        self.position = 0  # the prompt sampler's position after the last batch handed out (what a resume keeps)
        self.wait_seconds = 0.0  # the loop's time blocked on experience in the last get
        self._ready: queue.Queue = queue.Queue()
        self._changed = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def get(self, step: int) -> Experience:
        if self.max_staleness == 0:
            self.version = step
            experience = self.produce(step, step)
        else:
            if self._thread is None:
                self.version = step
                self._thread = threading.Thread(target=self._run, args=(step,), name="experience", daemon=True)
                self._thread.start()
            t0 = time.perf_counter()
            experience = self._ready.get()
            self.wait_seconds = time.perf_counter() - t0
            if isinstance(experience, BaseException):
                raise experience
        self.position = experience.sampler_position
        return experience

    def synced(self) -> None:
        """The engines took the weights of one more update: batches waiting on the staleness bound may start."""
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def _run(self, start: int) -> None:
        try:
            for k in range(start, self.end):
                with self._changed:  # batch k may be sampled from version k - N or later
                    self._changed.wait_for(lambda: self._stop or self.version >= k - self.max_staleness)
                    if self._stop:
                        return
                    version = self.version
                self._ready.put(self.produce(k, version))
        except BaseException as e:  # raised in the loop by its next get
            self._ready.put(e)

    def close(self) -> None:
        if self._thread is not None:
            with self._changed:
                self._stop = True
                self._changed.notify_all()
            self._thread.join()

    def __enter__(self) -> "ExperienceSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
