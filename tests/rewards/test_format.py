import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.format import FormatReward, answer_span, follows_format


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("<think>2 + 2 = 4</think><answer>4</answer>", True),
        ("\n<think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n", True),
        ("<answer>4</answer>", False),  # no reasoning block
        ("<think>x</think>", False),
        ("<think></think><answer>4</answer>", False),  # empty reasoning
        ("<think>x</think><answer> </answer>", False),
        ("<answer>4</answer><think>x</think>", False),  # wrong order
        ("<think>x</think><answer>4</answer> and also 5", False),  # text outside the blocks
        ("<think>x</think><answer>4</answer><answer>5</answer>", False),  # two answers
        ("<think><think>x</think></think><answer>4</answer>", False),
        ("preamble <think>x</think><answer>4</answer>", False),
    ],
)
def test_layout(completion, ok):
    assert follows_format(completion) is ok
    result = FormatReward(score=0.5).score(Sample("q", completion))
    assert (result.score, result.verdict) == ((0.5, Verdict.CORRECT) if ok else (0.0, Verdict.FORMAT_ERROR))


def test_answer_only_when_thinking_is_not_required():
    assert follows_format("<answer>4</answer>", require_think=False)
    assert not follows_format("<answer></answer>", require_think=False)
    assert follows_format("<think>x</think><answer>4</answer>", require_think=False)


def test_answer_span():
    assert answer_span("<think>a</think><answer>1</answer> then <answer> 2 </answer>") == "2"
    assert answer_span("<think>a</think> final: 3") == "final: 3"
    assert answer_span("plain 4") == "plain 4"
    assert answer_span("<answer> </answer>") is None


def test_megabyte_input_is_fast():
    import time

    text = "<think>" + "x" * 1_000_000 + "</think><answer>1</answer>"
    start = time.perf_counter()
    assert follows_format(text) and not follows_format(text + "<think>")
    assert time.perf_counter() - start < 1
