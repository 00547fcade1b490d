"""Math answers: extraction from free text and equivalence with math-verify.

Extraction order: the last \\boxed{...}, then <answer>...</answer>, then "#### ...", then the last number.
Equivalence: exact match of the normalised strings, then numeric equality, then math-verify (symbolic), whose
errors are raised (and reported by the scorer), never turned into a silent "wrong".
"""

from __future__ import annotations

import re

from rewards.base import RewardResult, Sample, Verdict

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None  # unbalanced: no answer rather than a guess


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when there is none.

    >>> extract_answer("so the total is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<answer> 42 </answer>"), extract_answer("... #### 1,234"), extract_answer("3 then 7")
    ('42', '1,234', '7')
    >>> extract_answer("I don't know") is None
    True
    """
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _normalise(answer: str) -> str:
    return answer.strip().strip(".$ ").replace(",", "").replace(" ", "")


def _as_number(answer: str) -> float | None:
    try:
        return float(_normalise(answer))
    except ValueError:
        return None


def answers_match(predicted: str, gold: str) -> bool:
    """Whether two answers are the same mathematical object.

    >>> answers_match("1,000", "1000"), answers_match("0.5", "\\\\frac{1}{2}"), answers_match("3", "4")
    (True, True, False)
    """
    if _normalise(predicted) == _normalise(gold):
        return True
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    from math_verify import parse, verify

    # Unparseable model output is a wrong answer; an error inside verify() is a verifier fault and surfaces.
    gold_parsed = parse(f"${gold}$", raise_on_error=False) or parse(gold, raise_on_error=False)
    pred_parsed = parse(f"${predicted}$", raise_on_error=False) or parse(predicted, raise_on_error=False)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, raise_on_error=True))


def gold_answer(gold: object) -> str:
    """The reference answer: GSM8K-style golds carry a worked solution ending in '#### answer'."""
    text = str(gold)
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else text.strip()


class MathReward:
    """1 for a correct final answer, 0 for a wrong one; no extractable answer is a format error (0).

    >>> MathReward().score(Sample(prompt="2+2=", completion="4", gold="4")).verdict.value
    'correct'
    >>> MathReward().score(Sample(prompt="2+2=", completion="five", gold="4")).verdict.value
    'format_error'
    """

    def __init__(self, correct: float = 1.0, wrong: float = 0.0):
        self.correct, self.wrong = correct, wrong

    def score(self, sample: Sample) -> RewardResult:
        predicted = extract_answer(sample.completion)
        if predicted is None:
            return RewardResult(self.wrong, Verdict.FORMAT_ERROR, info={"extracted": None})
        ok = answers_match(predicted, gold_answer(sample.gold))
        return RewardResult(
            self.correct if ok else self.wrong, Verdict.CORRECT if ok else Verdict.WRONG, info={"extracted": predicted}
        )
