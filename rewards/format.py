"""Format reward: the reply is `<think>...</think><answer>...</answer>` and nothing else.

Used beside a correctness reward with a small weight (DeepSeek-R1 style), so the policy keeps a parseable
layout without being paid for layout alone. Each tag must appear exactly once, in order, with non-empty
content; text outside the two blocks (other than whitespace) breaks the format, so a policy cannot hide a second
answer outside the tags.
"""

from __future__ import annotations

import re

from rlkit.rewards.base import RewardResult, Sample, Verdict

_LAYOUT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def answer_span(completion: str) -> str | None:
    """The text a puzzle verifier reads: the last <answer> block, else the reply after </think>; None if empty.

    >>> answer_span("<think>maybe 3</think><answer> 5 </answer>"), answer_span("<think>x</think>  ")
    ('5', None)
    """
    tags = _ANSWER.findall(completion)
    if tags:
        text = tags[-1]
    else:
        end = completion.rfind("</think>")
        text = completion if end < 0 else completion[end + len("</think>"):]
    return text.strip() or None


def follows_format(completion: str, require_think: bool = True) -> bool:
    """Whether the whole completion is exactly one think block then one answer block (both non-empty)."""
    if any(completion.count(tag) != 1 for tag in (_TAGS if require_think else _TAGS[2:])):
        return False
    if not require_think and "<think>" not in completion:
        match = re.fullmatch(r"\s*<answer>(.*?)</answer>\s*", completion, re.DOTALL)
        return bool(match and match.group(1).strip())
    match = _LAYOUT.fullmatch(completion)
    return bool(match and match.group(1).strip() and match.group(2).strip())


class FormatReward:
    """`score` for the think/answer layout, 0 otherwise (verdict FORMAT_ERROR).

    >>> FormatReward().score(Sample("q", "<think>2+2 is 4</think>\\n<answer>4</answer>")).score
    1.0
    >>> FormatReward().score(Sample("q", "<answer>4</answer>")).verdict.value
    'format_error'
    """

    def __init__(self, score: float = 1.0, require_think: bool = True):
        self.reward, self.require_think = score, require_think

    def score(self, sample: Sample) -> RewardResult:
        if follows_format(sample.completion, self.require_think):
            return RewardResult(self.reward, Verdict.CORRECT)
        return RewardResult(0.0, Verdict.FORMAT_ERROR)
