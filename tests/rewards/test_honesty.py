import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.honesty import HonestyReward, calibration_metrics, is_abstention


@pytest.mark.parametrize(
    "completion, score, verdict",
    [
        ("4", 1.0, Verdict.CORRECT),
        ("I don't know", 0.0, Verdict.ABSTAIN),
        ("i do not know.", 0.0, Verdict.ABSTAIN),
        ("5", -4.0, Verdict.WRONG),
        ("I don't know, maybe 5", -4.0, Verdict.WRONG),  # an answer is extractable: not an abstention
        ("banana", -4.0, Verdict.WRONG),  # unparseable is wrong, never abstention
        ("", -4.0, Verdict.WRONG),
        ("<think>3 or 5? not sure</think>I don't know", 0.0, Verdict.ABSTAIN),  # numbers only in the reasoning
        ("<answer>I do not know</answer>", 0.0, Verdict.ABSTAIN),
        ("\\boxed{5} I don't know", -4.0, Verdict.WRONG),  # an answer was given
        ("I don't know the answer to 2+2", -4.0, Verdict.WRONG),  # not the canonical phrase alone
    ],
)
def test_honesty_mapping(completion, score, verdict):
    result = HonestyReward().score(Sample("2+2=", completion, "4"))
    assert (result.score, result.verdict) == (score, verdict)


def test_custom_values():
    r = HonestyReward(correct=2.0, abstain=-0.5, wrong=-1.0)
    assert [r.score(Sample("q", c, "4")).score for c in ["4", "I don't know", "3"]] == [2.0, -0.5, -1.0]


def test_verifier_by_import_path():
    r = HonestyReward(verifier="tests.rewards.helpers:LengthReward", verifier_kwargs={"limit": 1})
    assert [r.score(Sample("q", c, None)).score for c in ["a", "abc", "I don't know"]] == [1.0, -4.0, 0.0]


def test_abstention_phrase():
    assert is_abstention("  I DON'T KNOW!  ")
    assert not is_abstention("I know: 4")


def test_calibration_by_hand():
    # 5 correct, 3 wrong, 2 abstain out of 10: accuracy .5, coverage .8, wrong .3,
    # selective risk 3/8 = .375, expected score (5 - 12) / 10 = -0.7
    v = [Verdict.CORRECT] * 5 + [Verdict.WRONG] * 2 + [Verdict.FORMAT_ERROR] + [Verdict.ABSTAIN] * 2
    m = calibration_metrics(v)
    assert m == pytest.approx(
        {"accuracy": 0.5, "coverage": 0.8, "wrong_rate": 0.3, "selective_risk": 0.375, "expected_score": -0.7}
    )


def test_all_abstain_has_zero_risk():
    assert calibration_metrics([Verdict.ABSTAIN] * 3)["selective_risk"] == 0.0
