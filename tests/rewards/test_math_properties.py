"""Property-based: hedged, negated and reformatted answers around random golds (docs/rewards.md, R1-R9).

Every reformatting of the gold must score correct; every hedge (the gold beside a different number), negation
or correction must not. Hypothesis draws the golds and the wrong numbers; each case runs MathReward directly.
"""

from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.math import MathReward

REWARD = MathReward(verify_timeout_s=2)
golds = st.one_of(st.integers(-10**13, 10**13), st.decimals("-99999.99", "99999.99", places=2).map(Fraction))
offsets = st.one_of(st.integers(1, 1000), st.integers(-1000, -1), st.just(Fraction(1, 10)), st.just(Fraction(-1, 100)))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def written(value: Fraction) -> str:
    """The plain decimal form: 1234, -0.5, 12.25."""
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.2f}".rstrip("0")
    return text


def grouped(value: Fraction, sep: str) -> str:
    """Thousands separators in groups of three: 1,234,567.5 (sep ","), 1\\,234 (sep "\\\\,")."""
    text = written(value)
    sign, text = ("-", text[1:]) if text.startswith("-") else ("", text)
    whole, _, frac = text.partition(".")
    groups = []
    while whole:
        groups.insert(0, whole[-3:])
        whole = whole[:-3]
    return sign + sep.join(groups) + ("." + frac if frac else "")


def verdict(completion: str, gold: Fraction) -> Verdict:
    return REWARD.score(Sample("q", completion, written(gold))).verdict


FORMS = [
    lambda v: f"The answer is {written(v)}.",
    lambda v: f"\\boxed{{{written(v)}}}",
    lambda v: f"#### {grouped(v, ',')}",
    lambda v: f"So she has \\boxed{{{grouped(v, chr(92) + ',')}}} apples.",
    lambda v: f"<answer>{grouped(v, chr(0x202F))}</answer>",
    lambda v: f"#### Step 1: think\nStill thinking.\n#### {written(v)} dollars",
    lambda v: f"\\boxed{{\\text{{{written(v)}}}}}",
    lambda v: f"The total is {written(v)}, not {written(v + 7)}.",
    lambda v: f"x = {written(v)}",
    lambda v: f"Wait, I first got {written(v + 3)}, which was wrong. The answer is \\boxed{{{written(v)}}}.",
]
HEDGES = [
    lambda v, w: f"The answer is {written(v)} or {written(w)}.",
    lambda v, w: f"\\boxed{{{written(w)}}} or \\boxed{{{written(v)}}}",
    lambda v, w: f"\\boxed{{{written(v)} \\lor {written(w)}}}",
    lambda v, w: f"So {written(w)} = {written(v)}.",
    lambda v, w: f"\\boxed{{{written(v)}}}. Wait, actually it is {written(w)}.",
    lambda v, w: f"\\boxed{{{written(v)}, {written(w)}}}",
    lambda v, w: f"#### {written(w)}\n#### {written(v)}",
    lambda v, w: f"It is {written(w)}, definitely not {written(v)}.",
    lambda v, w: f"\\boxed{{{written(w)}}}",
    lambda v, w: f"The answer is {written(w)}.",
]


@SETTINGS
@given(gold=golds, form=st.sampled_from(range(len(FORMS))))
def test_every_form_of_the_gold_is_correct(gold, form):
    gold = Fraction(gold)
    completion = FORMS[form](gold)
    assert verdict(completion, gold) == Verdict.CORRECT, completion


@SETTINGS
@given(gold=golds, offset=offsets, hedge=st.sampled_from(range(len(HEDGES))))
def test_no_hedge_negation_or_near_miss_is_correct(gold, offset, hedge):
    gold = Fraction(gold)
    completion = HEDGES[hedge](gold, gold + offset)
    assert verdict(completion, gold) != Verdict.CORRECT, completion


@SETTINGS
@given(gold=golds)
def test_negated_gold_alone_is_wrong(gold):
    gold = Fraction(gold)
    assert verdict(f"The answer is not {written(gold)}.", gold) == Verdict.WRONG
