"""Math answers: the answer specification of docs/rewards.md, rule by rule (the rule numbers below are its).

Extraction (R1-R6) reads the reply after the last </think>, in one form (rlkit.rewards.numeric.canonical_text):
- R1 markers: every \\boxed{...}/\\fbox{...} (balanced braces; one inside another is part of it), every closed
  <answer>...</answer>, and every "#### ..." that is not a Markdown heading (its text starts with a word of two
  or more letters: "#### Step 1: ..."). A marker inside a quotation ("...", “...”) is not one.
- R2 with markers: each distinct one is a final answer, and each must match (a hedge holds a wrong answer);
  more than MAX_ANSWERS distinct ones, or more than MAX_MARKERS markers, are wrong.
- R3 a correction after the last marker ("wait", "actually", ... then a different number) is wrong.
- R4 without markers: the final statement (the sentence of the last number) gives the answer: its last number
  that is not negated ("not 43", "isn't 43"); none left, two different numbers joined by "or" (or \\lor, ∨),
  or an equation between two different bare numbers ("42 = 43") is wrong.
- R5 no number at all: format_error.
Answers (R6-R9): too long, too deep, alternatives joined or arithmetic left undone (on the last side of an
equation) is wrong unread; numbers are read exactly (rlkit.rewards.numeric); an integer gold needs the exact integer,
another number a relative 1e-6; anything else goes to math-verify (symbolic). Model output math-verify cannot
parse is wrong; a gold it cannot parse, or an error inside its comparison, is raised (a verifier fault).
Every step is linear in the reply's length (braces matched in one pass, tags paired in one pass).
"""

from __future__ import annotations

import re

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.numeric import THIN, canonical, canonical_text, numbers_equal, parse_number

MAX_MARKERS = 64  # markers in one reply; more is wrong (and reading them all could be quadratic)
MAX_ANSWERS = 4  # distinct final answers a reply may restate (each must match); more is wrong
MAX_ANSWER_CHARS = 1000  # (or twice the gold's length) longer is wrong, unread
MAX_ANSWER_DEPTH = 30  # nesting of {}, () and []; deeper is wrong, unread (the LaTeX parser recurses)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_OPEN_TAG, _CLOSE_TAG = re.compile(r"<answer>", re.IGNORECASE), re.compile(r"</answer>", re.IGNORECASE)
_HASHES = re.compile(r"(?<!#)####(?!#)\s*([^\n]*)")
_HEADING = re.compile(r"[*_\s]*[A-Za-z]{2}")
_QUOTE = re.compile(r'"[^"\n]*"|“[^”\n]*”')
_MARKER_TEXT = re.compile(r"\\boxed|\\fbox|<answer>|####", re.IGNORECASE)
# A number in prose: a sign only where it cannot be a minus between two terms ("10-7" ends in 7, not -7);
# thousands separators only in groups of three; a fraction or scientific notation is one number.
_SEP = rf"[,{THIN}]"
_NUMBER = re.compile(
    r"(?:(?<![\w)}\]])-)?(?:\\[dt]?frac\{\d+\}\{\d+\}"
    r"|\d+/\d+(?![\d.])"
    r"|(?:\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×|·)\s*10\s*\^\s*\{?-?\d+\}?"
    rf"|\d{{1,3}}(?:{_SEP}\d{{3}})+(?:\.\d+)?(?!\d)"
    r"|\d+(?:\.\d+)?|(?<!\d)\.\d+)"
)
_NEGATION = re.compile(r"\b(?:not|never|isn't|aren't|wasn't|cannot|can't|won't)\b[^\d]{0,16}$", re.IGNORECASE)
_OR = re.compile(r"(?<![\\a-zA-Z])(?:or|either)(?![a-zA-Z])|\\lor(?![a-zA-Z])|\\vee(?![a-zA-Z])|∨", re.IGNORECASE)
_CORRECTION = re.compile(r"\b(?:wait|actually|correction|mistake|oops|sorry|instead|rather|i meant|scratch that|"
                         r"on second thought|hmm|no,)", re.IGNORECASE)
_OPERATOR = set("+-*/×÷^·⋅∗(")
_SENTENCE_ENDS = (". ", "! ", "? ", ".\t", "\n")
_HEDGE = re.compile(r"\\(?:lor|vee)(?![a-zA-Z])|∨|\\(?:text|textrm|mathrm)\s*\{\s*or\s*\}|(?<![\\a-zA-Z])(?:or|either)(?![a-zA-Z])")
_ARITHMETIC = re.compile(rf"\d[\s{THIN}]*(?:[-+*×÷·⋅∗]|\\times|\\cdot|\\div|\\ast)[\s{THIN}]*[({{]?[\s{THIN}]*-?\d")


def final_reply(text: str) -> str:
    """The part after the last </think>, or all of `text` when there is no reasoning block."""
    end = text.rfind("</think>")
    return text if end < 0 else text[end + len("</think>") :]


def _unquote(text: str) -> str:
    """`text` with every quotation that holds a marker blanked (a quoted marker is not the reply's answer)."""
    return _QUOTE.sub(lambda m: " " * len(m.group()) if _MARKER_TEXT.search(m.group()) else m.group(), text)


def _markers(text: str) -> list[tuple[int, int, str]] | None:
    """(start, end, content) of every R1 marker, in order; None when there are more than MAX_MARKERS."""
    found: list[tuple[int, int, str]] = []
    if _BOX.search(text):
        closing, stack = {}, []
        for m in re.finditer(r"[{}]", text):  # every brace matched in one pass
            if m.group() == "{":
                stack.append(m.start())
            elif stack:
                closing[stack.pop()] = m.start()
        covered = -1
        for m in _BOX.finditer(text):
            close = closing.get(m.end() - 1)
            if close is None or m.start() < covered:  # unbalanced: no answer; inside another box: part of it
                continue
            covered = close
            found.append((m.start(), close + 1, text[m.end() : close].strip()))
            if len(found) > MAX_MARKERS:
                return None
    closes = [m.start() for m in _CLOSE_TAG.finditer(text)]
    j, after = 0, 0
    for m in _OPEN_TAG.finditer(text):  # each <answer> with the first </answer> after it, in one pass
        if m.start() < after:
            continue
        while j < len(closes) and closes[j] < m.end():
            j += 1
        if j == len(closes):
            break
        found.append((m.start(), closes[j] + len("</answer>"), text[m.end() : closes[j]].strip()))
        after = closes[j]
        if len(found) > MAX_MARKERS:
            return None
    for m in _HASHES.finditer(text):
        if not _HEADING.match(m.group(1)):
            found.append((m.start(), m.end(), m.group(1).strip()))
            if len(found) > MAX_MARKERS:
                return None
    return sorted(f for f in found if f[2])


def _correction(text: str, last: tuple[int, int, str]) -> str:
    """R3: why the text after the last marker takes the answer back, or ""."""
    word = _CORRECTION.search(text, last[1])
    if word is None:
        return ""
    answer = parse_number(_unwrap(last[2]))
    for m in _NUMBER.finditer(text, word.end()):
        value = parse_number(m.group())
        if value is not None and value != answer:
            return f"a correction after the final answer ({word.group()!r} ... {m.group()[:20]!r})"
    return ""


def _final_statement(text: str) -> tuple[str | None, str]:
    """R4: (the answer of a reply without markers, why it has none despite numbers, or "")."""
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return None, ""
    start = max(text.rfind(end, 0, numbers[-1].start()) for end in _SENTENCE_ENDS) + 1
    sentence = [m for m in numbers if m.start() >= start]
    kept, previous_end = [], start
    for m in sentence:
        if not _NEGATION.search(text, previous_end, m.start()):
            kept.append(m)
        previous_end = m.end()
    if not kept:
        return None, "the final statement only rejects numbers"
    differ = lambda a, b: parse_number(a.group()) != parse_number(b.group())  # parsed only where needed
    for a, b in zip(kept, kept[1:]):
        if _OR.search(text, a.end(), b.start()) and differ(a, b):
            return None, f"alternatives: {a.group()!r} or {b.group()!r}"
    for a, b in zip(sentence, sentence[1:]):
        if text[a.end() : b.start()].strip() != "=":
            continue
        before = text[max(0, a.start() - 40) : a.start()].rstrip()[-1:]  # bounded windows: linear overall
        after = text[b.end() : b.end() + 40].lstrip()[:1]
        if before not in _OPERATOR and after not in _OPERATOR and differ(a, b):
            return None, f"an equation between different numbers: {a.group()!r} = {b.group()!r}"
    return kept[-1].group(), ""


def _unwrap(answer: str) -> str:
    """An answer without an outer \\boxed{...} (a box inside an <answer> tag, say)."""
    m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", answer.strip(), re.DOTALL)
    return m.group(1).strip() if m else answer


def final_answers(text: str) -> list[str]:
    """Every final answer (R1 marker) of the reply, in order; [] when it has none.

    >>> final_answers("\\\\boxed{1} or \\\\boxed{2}"), final_answers("so \\\\boxed{4}\\n#### 4")
    (['1', '2'], ['4', '4'])
    >>> final_answers("#### Step 1: add\\n3 + 4 = \\\\boxed{7}"), final_answers('the hint "#### 6" is wrong')
    (['7'], [])
    """
    markers = _markers(_unquote(canonical_text(final_reply(text))))
    return [_unwrap(m[2]) for m in markers or []]


def extract_answer(text: str) -> str | None:
    """The final answer in `text` (its last marker, else R4's answer), or None when there is none.

    >>> extract_answer("so the total is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("<answer> 42 </answer>"), extract_answer("... #### 1,234"), extract_answer("3 then -7")
    ('42', '1,234', '-7')
    >>> extract_answer("The answer is 42, not 43."), extract_answer("It is not 5."), extract_answer("5 or 6")
    ('42', None, None)
    """
    answers = final_answers(text)
    if answers:
        return answers[-1]
    return _final_statement(_unquote(canonical_text(final_reply(text))))[0]


def implausible(answer: str, gold: str) -> str:
    """Why `answer` is wrong without being read (R6: too long, too deep, alternatives joined, arithmetic left
    undone or an equation between different numbers against a numeric gold), or "".

    >>> implausible("1 \\\\lor 2", "2"), implausible("{" * 40 + "1" + "}" * 40, "1"), implausible("3", "3")
    ('it joins alternatives', 'nested 40 deep', '')
    >>> implausible("x = 2+63", "65"), implausible("7 \\\\times 8", "56"), implausible("1/2", "0.5"), implausible("42 = 43", "42")
    ('arithmetic left undone', 'arithmetic left undone', '', 'an equation between different numbers')
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
    if parse_number(gold) is not None:
        sides = canonical(answer).split("=")
        values = {v for v in map(parse_number, sides) if v is not None}
        if len(values) > 1:
            return "an equation between different numbers"
        if _ARITHMETIC.search(sides[-1]) and parse_number(sides[-1]) is None:
            return "arithmetic left undone"
    return ""


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
    """Whether two answers are the same mathematical object (R7-R9; `timeout_s`: math-verify's own alarm).

    >>> answers_match("1,000", "1000"), answers_match("0.5", "\\\\frac{1}{2}"), answers_match("3", "4")
    (True, True, False)
    >>> answers_match("1,2", "12"), answers_match(".5", "5"), answers_match("10_2", "102"), answers_match("x = 5", "5")
    (False, False, False, True)
    """
    predicted, gold = _unwrap(predicted), _unwrap(gold)
    if canonical(predicted) == canonical(gold):
        return True
    b = parse_number(gold)
    if b is not None:
        if "=" in predicted:
            predicted = predicted.rsplit("=", 1)[1]  # "x = 5": the value
        a = parse_number(predicted)
        if a is not None:
            return numbers_equal(a, b)
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
        reply = _unquote(canonical_text(final_reply(sample.completion)))
        markers = _markers(reply)
        if markers is None:
            return RewardResult(self.wrong, Verdict.WRONG, info={"extracted": None, "reason": "too many markers"})
        if markers:
            answers, reason = [_unwrap(m[2]) for m in markers], _correction(reply, markers[-1])
        else:
            answer, reason = _final_statement(reply)
            answers = [answer] if answer else []
        info = {"extracted": answers[-1][:200] if answers else None}
        if reason:
            return RewardResult(self.wrong, Verdict.WRONG, info=info | {"reason": reason})
        if not answers:
            return RewardResult(self.wrong, Verdict.FORMAT_ERROR, info=info)
        distinct = list(dict.fromkeys(answers, None))  # in order; restating one answer is no hedge
        info["answers"] = len(distinct)
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
