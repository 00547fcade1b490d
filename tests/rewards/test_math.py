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


# docs/rewards.md, rule by rule: (completion, gold, expected verdict). C correct, W wrong, F format_error.
C, W, F = Verdict.CORRECT, Verdict.WRONG, Verdict.FORMAT_ERROR
RULES = {
    "R1-markers": [
        ("#### Step 1: add\n3 + 4 = 7\n\\boxed{7}", "7", C),  # a heading is no marker
        ("#### **Answer**\nIt is 7.", "7", C),
        ("#### x = 7", "7", C),  # a one-letter start is an answer, not a heading
        ("####\n7", "7", C),  # the next line
        ("##### 8\nIt is 7.", "7", C),  # five #: a heading level, not GSM8K's marker
        ('He wrote "\\boxed{8}" but it is 7.', "7", C),  # quoted marker
        ("\\boxed{\\boxed{7}}", "7", C),  # one inside another is part of it
        ("\\boxed{7", "7", C),  # unclosed: no marker, the last number
        ("<answer>7", "7", C),
    ],
    "R2-several-markers": [
        ("\\boxed{7} and again \\boxed{7}", "7", C),
        ("\\boxed{6} \\boxed{7}", "7", W),
        ("\\boxed{6}" + "\\boxed{7}" * 30, "7", W),  # far back still counts
        ("".join(f"<answer>{i}</answer>" for i in range(5)), "4", W),
        ("\\boxed{7}" * 65, "7", W),
    ],
    "R3-corrections": [
        ("\\boxed{7}. Actually, it is 8.", "7", W),
        ("\\boxed{7}. Wait, let me check: 7 is right.", "7", C),
        ("\\boxed{7}. Step 2 shows why.", "7", C),  # no correction word
        ("Hmm, 8? No. \\boxed{7}", "7", C),  # before the marker: reasoning
    ],
    "R4-final-statement": [
        ("It is 7, not 8.", "7", C),
        ("It isn't 7.", "7", W),
        ("The answer is never 7", "7", W),
        ("7 or 8", "7", W),
        ("7 or 7", "7", C),
        ("So 8 = 7.", "7", W),
        ("So 3 + 4 = 7.", "7", C),
        ("2 hours = 120 minutes", "120", C),  # a unit between: not two bare numbers
        ("It is 8 or 9. Then the total is 7.", "7", C),  # only the final statement counts
        ("I have no doubt that the answer is 7.", "7", C),  # "no" is no negation of the number
        ("The answer is not equal to 7.", "7", W),
    ],
    "R5-nothing": [("I cannot tell.", "7", F), ("", "7", F)],
    "R6-unread": [
        ("\\boxed{3+4}", "7", W),
        ("\\boxed{y = 3+4}", "7", W),
        ("\\boxed{3\\;+\\;4}", "7", W),
        ("\\boxed{7 = 8}", "7", W),
        ("\\boxed{7 \\text{ or } 8}", "7", W),
        ("\\boxed{3/4}", "0.75", C),
        ("\\boxed{1.4 \\times 10^{1}}", "14", C),  # scientific notation is a number, not a product
    ],
    "R7-numbers": [
        ("\\boxed{1,234,567}", "1234567", C),
        ("\\boxed{1\\,234\\,567}", "1234567", C),
        ("\\boxed{1{,}234}", "1234", C),
        ("\\boxed{1\u00a0234}", "1234", C),
        ("\\boxed{12,34}", "1234", W),
        ("\\boxed{1,234 567}", "1234567", W),
        ("\\boxed{0.5}", ".5", C),
        ("\\boxed{.5}", "5", W),
        ("\\boxed{007}", "7", C),  # leading zeros change nothing
        ("00", "0", C),
        ("\\boxed{070}", "7", W),
        ("\\boxed{10_000}", "10000", W),
        ("\\boxed{\\$1,000}", "1000", C),
        ("\\boxed{20 \\%}", "20", C),
        ("\\boxed{7 cm.}", "7", C),
        ("\\boxed{7e3}", "7000", C),
        ("\\boxed{−7}", "-7", C),
        ("\\boxed{7x}", "7", W),
    ],
    "R8-comparison": [
        ("\\boxed{72.0}", "72", C),
        ("\\boxed{72.000001}", "72", W),
        ("\\boxed{9999999999}", "10000000000", W),
        ("\\boxed{100000000000000000001}", "100000000000000000000", W),
        ("\\boxed{12.250}", "12.25", C),
        ("\\boxed{12.26}", "12.25", W),
        ("\\boxed{0.3333333}", "\\frac{1}{3}", C),
        ("\\boxed{0.33}", "\\frac{1}{3}", W),
        ("\\boxed{x = 7}", "7", C),
    ],
    "R9-symbolic": [
        ("\\boxed{\\sqrt{4}}", "2", C),
        ("\\boxed{x+1}", "1+x", C),
        ("\\boxed{(1, 2]}", "(1, 2]", C),
        ("\\boxed{hello}", "7", W),
    ],
}


@pytest.mark.parametrize("rule, completion, gold, expected",
                         [(rule, *case) for rule, cases in RULES.items() for case in cases],
                         ids=[f"{rule}-{i}" for rule, cases in RULES.items() for i in range(len(cases))])
def test_answer_specification(rule, completion, gold, expected):
    result = MathReward(verify_timeout_s=2).score(Sample("q", completion, gold))
    assert result.verdict == expected, (rule, completion, result.info)


def test_extraction_cost_is_linear():
    # unclosed tags, unbalanced braces, quotes and hashes: ten times the text takes about ten times as long
    def cost(n):
        text = ("<answer>" * n + "\\boxed{" * n + '"' * n + "#" * n + "not 1 or 2 = " * n) + "5"
        start = time.perf_counter()
        MathReward().score(Sample("q", text, "5"))
        return time.perf_counter() - start

    cost(100)  # warm up
    small, large = min(cost(2_000) for _ in range(3)), min(cost(20_000) for _ in range(3))
    assert large < 30 * small + 0.05, (small, large)  # quadratic would be ~100x
