"""User-style reward classes for the scorer tests, loaded by import_path in worker processes."""

import os
import sys
import time

from rlkit.rewards.base import RewardResult, Sample, Verdict


class LengthReward:
    """A user reward with a constructor argument: 1 when the completion is at most `limit` characters."""

    def __init__(self, limit: int = 3):
        self.limit = limit

    def score(self, sample: Sample) -> RewardResult:
        ok = len(sample.completion) <= self.limit
        return RewardResult(1.0 if ok else 0.0, Verdict.CORRECT if ok else Verdict.WRONG)


class Flaky:
    """Raises on 'boom', sleeps forever on 'hang', exits the process on 'exit', calls sys.exit on 'sysexit',
    returns an unpicklable info value on 'lambda'."""

    def score(self, sample: Sample) -> RewardResult:
        if "boom" in sample.completion:
            raise ValueError("boom")
        if "sysexit" in sample.completion:
            sys.exit(3)
        if "lambda" in sample.completion:
            return RewardResult(1.0, Verdict.CORRECT, info={"fn": lambda: None})
        if "hang" in sample.completion:
            time.sleep(3600)
        if "exit" in sample.completion:
            os._exit(0)
        return RewardResult(1.0, Verdict.CORRECT)


class FlakyWithWrong(Flaky):
    """Flaky with a wrong-answer value: the score a sample that outlasts the deadline gets."""

    wrong = -2.0


class NotAReward:
    pass


class AlwaysRaises:
    """A reward whose every call fails: with reward.on_error=fail the run stops at its first evaluation."""

    def score(self, sample: Sample) -> RewardResult:
        raise ValueError("this reward always fails")
