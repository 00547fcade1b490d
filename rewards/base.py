"""The reward API: a reward is a small class with `score(sample) -> RewardResult`.

Batching, concurrency, deadlines and sandboxing belong to the scorer (`rlkit.rewards.scorer`), not to each reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Protocol, runtime_checkable


class Verdict(str, Enum):
    CORRECT = "correct"
    WRONG = "wrong"
    ABSTAIN = "abstain"  # a canonical "I don't know" with no extractable answer
    FORMAT_ERROR = "format_error"
    TIMEOUT = "timeout"  # the answer kept the verifier past its deadline: scored wrong, counted apart
    ERROR = "error"  # the verifier raised (reported by the scorer, never a silent 0; reward.on_error applies)


@dataclass(frozen=True)
class Sample:
    """One completion to score. `gold` is the reference answer (or tests, for code) when the task has one."""

    prompt: str
    completion: str
    gold: Any = None
    task: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    score: float
    verdict: Verdict
    components: Mapping[str, float] = field(default_factory=dict)  # named parts, each logged
    info: Mapping[str, Any] = field(default_factory=dict)  # e.g. the extracted answer


@runtime_checkable
class Reward(Protocol):
    """What a user implements. A class with this method (and any constructor kwargs) plugs in by import_path.

    Optional extras the scorer uses when present:
    - `warmup()`: called once in each worker after construction, so slow imports (sympy, a tokenizer) happen
      before the first sample's deadline starts.
    - `budget_s`: the most seconds the reward itself lets one sample run (e.g. the code sandbox's wall clock);
      the scorer refuses a `reward.timeout_s` that leaves no room for it.
    - `summarize(verdicts) -> dict[str, float]`: batch metrics added to the scorer's stats (honesty calibration).
    - `wrong`: the score of a wrong answer; a sample that runs past the scorer's deadline (TIMEOUT, the model's
      fault) gets it (default 0.0).
    """

    def score(self, sample: Sample) -> RewardResult: ...
