import time
from pathlib import Path

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.math import MathReward, answers_match, extract_answer, gold_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{a}{\\sqrt{b}}} and then \\boxed{7}", "7"),
        ("nested \\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),
        ("<think>3 + 4</think><answer>7</answer>", "7"),
        ("Natalia sold 48 clips... #### 72", "72"),
        ("so 1,234 apples", "1,234"),
        ("it is -3.5 degrees", "-3.5"),
        ("first 3 then 10", "10"),
        ("so 10-7", "7"),  # a minus between terms is not a sign
        ("the set 3,4,5", "5"),  # not a thousands separator
        ("half: $\\frac{1}{2}$", "\\frac{1}{2}"),  # a trailing fraction is one number
        ("three quarters, 3/4", "3/4"),
        ("<think>try \\boxed{3}</think> so it is 5", "5"),  # only the reply after the reasoning counts
        ("#### ", None),
        ("\\boxed{unbalanced", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_extraction(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("0.5", "\\frac{1}{2}", True),
        ("1,000", "1000", True),
        ("72", "72.0", True),
        ("\\sqrt{4}", "2", True),
        ("x+1", "1+x", True),
        ("3", "4", False),
        ("abc", "4", False),
    ],
)
def test_equivalence(pred, gold, same):
    assert answers_match(pred, gold) is same


@pytest.mark.parametrize("gold", [None, "", "  "])
def test_a_missing_gold_is_a_verifier_fault_not_a_wrong_answer(gold):
    with pytest.raises(ValueError, match="no gold answer"):
        MathReward().score(Sample("q", "\\boxed{x^2}", gold))


def test_math_verify_timeout_is_a_timeout_verdict(monkeypatch):
    # math-verify's alarm raises TimeoutException, a BaseException; it must become TIMEOUT, not escape or be
    # read as a wrong answer. (The hard deadline for inputs its alarm cannot stop is the scorer's, tested there.)
    from math_verify.errors import TimeoutException

    def slow(*args):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr("rlkit.rewards.math.answers_match", slow)
    result = MathReward(verify_timeout_s=1).score(Sample("q", "\\boxed{x^2}", "\\frac{1}{2}"))
    assert result.verdict == Verdict.TIMEOUT and "gave up after 1s" in result.info["error"]


def test_gsm8k_gold_uses_the_final_answer():
    assert gold_answer("She has 3 + 4 = 7 apples.\n#### 7") == "7"


def test_math_reward_verdicts():
    r = MathReward()
    assert r.score(Sample("q", "so \\boxed{7}", "7")).verdict == Verdict.CORRECT
    wrong = r.score(Sample("q", "8", "7"))
    assert wrong.verdict == Verdict.WRONG and wrong.score == 0.0 and wrong.info["extracted"] == "8"
    assert r.score(Sample("q", "no idea", "7")).verdict == Verdict.FORMAT_ERROR


def test_real_gsm8k_answers_are_recognised():
    import json

    with open(Path(__file__).parents[2] / "data" / "gsm8k_test.jsonl") as f:
        rows = [json.loads(next(f)) for _ in range(20)]
    r = MathReward()
    for row in rows:
        final = row["answer"].split("####")[-1].strip()
        assert r.score(Sample(row["question"], f"The answer is {final}.", row["answer"])).verdict == Verdict.CORRECT
        wrong = str(int(final.replace(",", "")) + 1)
        assert r.score(Sample(row["question"], f"The answer is {wrong}.", row["answer"])).verdict == Verdict.WRONG


def test_megabyte_input_is_handled_quickly():
    text = "1" * 1_000_000 + " and finally 5"
    start = time.perf_counter()
    assert MathReward().score(Sample("q", text, "5")).verdict == Verdict.CORRECT
    assert time.perf_counter() - start < 2
