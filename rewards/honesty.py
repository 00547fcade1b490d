"""The honesty reward: correct = +1, "I don't know" = 0, wrong = -4, around any verifier.

Answering is worth it only when the model is right more than 80% of the time (p - 4(1 - p) > 0), so a
calibrated policy learns to abstain on problems it cannot solve. Abstention must be explicit: the canonical
phrase alone, as the whole reply (after any <think> block) or as the whole content of the final answer slot
(\\boxed{} or <answer>), so there is no other answer to extract. Anything else without a valid answer
(garbage, a format error) is wrong: otherwise a policy could learn that gibberish is a free abstention.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

from rlkit.rewards.base import Reward, RewardResult, Sample, Verdict
from rlkit.rewards.math import extract_answer, final_reply
from rlkit.rewards.registry import builtin_reward, instantiate, load_class

ABSTAIN_PHRASE = "I don't know"
_ABSTAIN = re.compile(r"^\W*i\s+(?:don['’]?t|do\s+not)\s+know\W*$", re.IGNORECASE)


def is_abstention(text: str) -> bool:
    """The canonical abstention alone (case, spacing and punctuation aside), or alone in the answer slot.

    >>> is_abstention("I don't know."), is_abstention("i do not know"), is_abstention("I don't know, maybe 7")
    (True, True, False)
    >>> is_abstention("<think>3 or 5?</think><answer>I don't know</answer>"), is_abstention("\\\\boxed{I do not know}")
    (True, True)
    """
    reply = final_reply(text).strip()
    if _ABSTAIN.match(reply):
        return True
    answer = extract_answer(reply)  # the slot the verifier would read: it must hold the phrase and nothing else
    return answer is not None and bool(_ABSTAIN.match(answer))


class HonestyReward:
    """Wraps a verifier reward (a built-in name, or "pkg.module:Class") and rescores its verdicts.

    >>> r = HonestyReward()
    >>> [r.score(Sample("2+2=", c, "4")).score for c in ["4", "I don't know", "5", "no idea"]]
    [1.0, 0.0, -4.0, -4.0]
    """

    def __init__(self, verifier: str = "math", correct: float = 1.0, abstain: float = 0.0, wrong: float = -4.0,
                 verifier_kwargs: dict | None = None):
        field = "honesty.verifier"
        if ":" in verifier:
            self.verifier: Reward = instantiate(load_class(verifier, field), verifier_kwargs or {}, field)
        else:
            self.verifier = builtin_reward(verifier, verifier_kwargs or {}, field)
        self.correct, self.abstain, self.wrong = correct, abstain, wrong

    def warmup(self) -> None:
        if callable(getattr(self.verifier, "warmup", None)):
            self.verifier.warmup()

    def summarize(self, verdicts: list[Verdict]) -> dict[str, float]:
        """Calibration of a batch, with this reward's values (the scorer adds it to its stats)."""
        return calibration_metrics(verdicts, self.correct, self.abstain, self.wrong)

    @property
    def budget_s(self) -> float:
        return float(getattr(self.verifier, "budget_s", 0.0) or 0.0)  # the verifier's own time limit, if any

    def score(self, sample: Sample) -> RewardResult:
        if is_abstention(sample.completion):
            return RewardResult(self.abstain, Verdict.ABSTAIN, info={"abstained": True})
        inner = self.verifier.score(sample)
        if inner.verdict in (Verdict.ERROR, Verdict.TIMEOUT):
            return inner  # a verifier fault stays a fault, for the scorer to report
        if inner.verdict == Verdict.CORRECT:
            return RewardResult(self.correct, Verdict.CORRECT, info=dict(inner.info))
        # wrong, or unparseable: never mistaken for an abstention
        return RewardResult(self.wrong, Verdict.WRONG, info=dict(inner.info) | {"inner_verdict": inner.verdict.value})


def calibration_metrics(verdicts: Iterable[Verdict], correct: float = 1.0, abstain: float = 0.0,
                        wrong: float = -4.0) -> dict[str, float]:
    """accuracy, coverage (share answered), wrong-answer rate, selective risk (wrong / answered), expected score.

    >>> m = calibration_metrics([Verdict.CORRECT] * 6 + [Verdict.WRONG] * 2 + [Verdict.ABSTAIN] * 2)
    >>> m["accuracy"], m["coverage"], m["wrong_rate"], m["selective_risk"], m["expected_score"]
    (0.6, 0.8, 0.2, 0.25, -0.2)
    """
    counts = Counter(verdicts)
    n = max(sum(counts.values()), 1)
    right = counts[Verdict.CORRECT]
    abstained = counts[Verdict.ABSTAIN]
    wrong_n = n - right - abstained  # wrong, format errors, timeouts and errors all count against
    answered = n - abstained
    return {
        "accuracy": right / n,
        "coverage": answered / n,
        "wrong_rate": wrong_n / n,
        "selective_risk": wrong_n / answered if answered else 0.0,
        "expected_score": (right * correct + abstained * abstain + wrong_n * wrong) / n,
    }
