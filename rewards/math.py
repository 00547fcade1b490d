"""Math answers: extraction from free text and equivalence with math-verify.

Extraction reads the reply after the last </think> (reasoning may try answers it later drops), in this
order: the last \\boxed{...}, then <answer>...</answer>, then "#### ...", then the last number
(a fraction such as \\frac{1}{2} or 3/4 counts as one number).
Equivalence: exact match of the normalised strings, then numeric equality, then math-verify (symbolic).
Hedging is wrong: a reply whose final answers (every \\boxed, <answer> and "####" in it) differ is correct only
when each of them matches the gold, and an answer that joins alternatives ("1 \\lor 2", "1 or 2") is wrong.
An answer too long or too deeply nested to be a plausible one is wrong without reaching math-verify.
Model output that math-verify cannot parse is a wrong answer; a gold answer it cannot parse, or an error
inside its comparison, is a verifier fault and is raised (the scorer reports it), never a silent "wrong".
"""

from __future__ import annotations

import re

from rlkit.rewards.base import RewardResult, Sample, Verdict

# A sign only where it cannot be a minus between two terms ("10-7" ends in 7, not -7); thousands separators
# only in groups of three, so "3,4,5" is not read as 345.
_SIGN = r"(?:(?<![\w)}\]])-)?"
_NUMBER = re.compile(
    _SIGN + r"(?:\\d?frac\{\d+\}\{\d+\}"  # \frac{1}{2}, \dfrac{1}{2}
    r"|\d+/\d+(?![\d.])"  # 3/4
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)"  # 1,234.5
    r"|\d+(?:\.\d+)?|\.\d+)"
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    return None if brace < 0 else _balanced(text, brace)  # unbalanced: no answer rather than a guess


MAX_ANSWERS = 4  # distinct final answers a reply may restate (each must match); more is wrong
MAX_ANSWER_CHARS = 1000  # (or twice the gold's length) longer is wrong, unread
MAX_ANSWER_DEPTH = 30  # nesting of {}, () and []; deeper is wrong, unread (the LaTeX parser recurses)
# A plain number, and arithmetic left undone ("2+63", "7 \times 8"): against a numeric gold the latter is the
# question copied back, which math-verify would evaluate and call correct. Fractions ("1/2", \frac) are answers.
_PLAIN_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_ARITHMETIC = re.compile(r"\d\s*(?:[-+*×÷]|\\times|\\cdot|\\div)\s*[({]?\s*-?\d")
_HEDGE = re.compile(r"\\(?:lor|vee)(?![a-zA-Z])|\\(?:text|textrm|mathrm)\s*\{\s*or\s*\}|(?<![\\a-zA-Z])or(?![a-zA-Z])")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _balanced(text: str, brace: int) -> str | None:
    """The content of the {...} opening at `brace`, or None when it never closes."""
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None


def final_answers(text: str) -> list[str]:
    """Every final answer the reply (after any </think>) offers: each non-empty \\boxed{...} (at most the last
    16), <answer>...</answer> and "#### ..."; [] when it has none of these.

    >>> final_answers("\\\\boxed{1} or \\\\boxed{2}"), final_answers("so \\\\boxed{4}\\n#### 4")
    (['1', '2'], ['4', '4'])
    >>> final_answers("it is 5")
    []
    """
    text = final_reply(text)
    boxes = list(_BOX.finditer(text))[-16:]
    answers = [_balanced(text, m.end() - 1) for m in boxes]
    answers += [t.strip() for t in _ANSWER_TAG.findall(text)] + [h.strip() for h in _HASHES.findall(text)]
    return [a for a in answers if a]


def implausible(answer: str, gold: str) -> str:
    """Why `answer` is wrong without being read (too long, too deep, alternatives joined, arithmetic left undone
    against a numeric gold), or "".

    >>> implausible("1 \\\\lor 2", "2"), implausible("{" * 40 + "1" + "}" * 40, "1"), implausible("3", "3")
    ('it joins alternatives', 'nested 40 deep', '')
    >>> implausible("2+63", "65"), implausible("7 \\\\times 8", "56"), implausible("1/2", "0.5"), implausible("-3", "-3")
    ('arithmetic left undone', 'arithmetic left undone', '', '')
    """
    if len(answer) > max(MAX_ANSWER_CHARS, 2 * len(gold)):
        return f"{len(answer)} characters long"
    depth = deepest = 0
    for ch in answer:
        depth += (ch in "{([") - (ch in "})]")
        deepest = max(deepest, depth)
    if deepest > MAX_ANSWER_DEPTH:
        return f"nested {deepest} deep"
    if _HEDGE.search(answer) and not _HEDGE.search(gold):
        return "it joins alternatives"
    if _PLAIN_NUMBER.fullmatch(gold.strip()) and "=" not in answer and _ARITHMETIC.search(answer):
        return "arithmetic left undone"
    return ""


def final_reply(text: str) -> str:
    """The part after the last </think>, or all of `text` when there is no reasoning block."""
    end = text.rfind("</think>")
    return text if end < 0 else text[end + len("</think>") :]


def extract_answer(text: str) -> str | None:
    """The final answer in `text`, or None when there is none.

    >>> extract_answer("so the total is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<answer> 42 </answer>"), extract_answer("... #### 1,234"), extract_answer("3 then -7")
    ('42', '1,234', '-7')
    >>> extract_answer("I don't know") is None, extract_answer("<think>maybe \\\\boxed{3}</think> it is 5")
    (True, '5')
    """
    text = final_reply(text)
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    hashes = _HASHES.findall(text)
    if hashes and hashes[-1].strip():
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


def _parse(text: str, timeout_s: int) -> list:
    """math-verify's reading of `text` ([] when it is not math); its timeout is raised, not logged and dropped."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    # Wrapped in $...$ first so bare LaTeX (\\frac{1}{2}) is read as math; then as plain text.
    for candidate in (f"${text}$", text):
        try:
            parsed = parse(candidate, parsing_timeout=timeout_s, raise_on_error=True)
        except TimeoutException:
            raise
        except Exception:  # not math: for the gold that is the caller's error, for a prediction a wrong answer
            parsed = []
        if parsed:
            return parsed
    return []


def answers_match(predicted: str, gold: str, timeout_s: int = 5) -> bool:
    """Whether two answers are the same mathematical object (`timeout_s`: math-verify's own alarm, whole seconds).

    >>> answers_match("1,000", "1000"), answers_match("0.5", "\\\\frac{1}{2}"), answers_match("3", "4")
    (True, True, False)
    """
    if _normalise(predicted) == _normalise(gold):
        return True
    a, b = _as_number(predicted), _as_number(gold)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    from math_verify import verify

    gold_parsed = _parse(gold, timeout_s)
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold[:200]!r}")
    pred_parsed = _parse(predicted, timeout_s)
    if not pred_parsed:
        return False  # the model's answer is not math we can read: wrong
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s, raise_on_error=True))


def gold_answer(gold: object) -> str:
    """The reference answer: GSM8K-style golds carry a worked solution ending in '#### answer'."""
    text = str(gold)
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else text.strip()


class MathReward:
    """`correct` for a right final answer, `wrong` otherwise; no extractable answer is a FORMAT_ERROR (`wrong`).

    >>> MathReward().score(Sample(prompt="2+2=", completion="so \\\\boxed{4}", gold="4")).verdict.value
    'correct'
    >>> MathReward().score(Sample(prompt="2+2=", completion="five", gold="4")).verdict.value
    'format_error'
    """

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, verify_timeout_s: int = 5):
        self.correct, self.wrong = correct, wrong
        self.verify_timeout_s = verify_timeout_s  # math-verify's alarm; the scorer's deadline is the hard one

    def warmup(self) -> None:
        """Import sympy and math-verify before the first deadline starts (the scorer's workers call this)."""
        answers_match("x+1", "1+x", self.verify_timeout_s)

    def score(self, sample: Sample) -> RewardResult:
        from math_verify.errors import TimeoutException  # a BaseException: would escape `except Exception`

        gold = gold_answer(sample.gold)
        if sample.gold is None or not gold:  # a data problem: scoring every such sample 0 would hide it
            raise ValueError("the sample has no gold answer")
        answers = final_answers(sample.completion) or [a for a in [extract_answer(sample.completion)] if a]
        if not answers:
            return RewardResult(self.wrong, Verdict.FORMAT_ERROR, info={"extracted": None})
        distinct = list(dict.fromkeys(answers, None))  # in order; restating one answer is no hedge
        info = {"extracted": answers[-1][:200], "answers": len(distinct)}
        if len(distinct) > MAX_ANSWERS:
            return RewardResult(self.wrong, Verdict.WRONG, info=info | {"reason": "too many final answers"})
        try:
            for answer in distinct:  # a hedge holds a wrong answer: every one must match
                reason = implausible(answer, gold) or ("" if answers_match(answer, gold, self.verify_timeout_s)
                                                       else "does not match")
                if reason:
                    return RewardResult(self.wrong, Verdict.WRONG, info=info | {"reason": f"{answer[:50]!r}: {reason}"})
        except TimeoutException:
            message = f"math-verify gave up after {self.verify_timeout_s}s"
            return RewardResult(self.wrong, Verdict.TIMEOUT, info=info | {"error": message})
        return RewardResult(self.correct, Verdict.CORRECT, info=info)
