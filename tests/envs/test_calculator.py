"""The calculator against hand-worked values, and against inputs meant to stall it, escape it or crash it."""

import time

import pytest

from rlkit.envs.calculator import CalculatorError, evaluate, format_value


@pytest.mark.parametrize("expression, value", [
    ("37*58", 2146),  # 37*58 = 37*50 + 37*8 = 1850 + 296
    ("12 + 3 * 4", 24),  # precedence: 3*4 first
    ("(12 + 3) * 4", 60),
    ("-7 // 2", -4),  # floor division rounds toward minus infinity
    ("-7 % 3", 2),  # Python's modulo takes the divisor's sign: -7 = -3*3 + 2
    ("2 ** 10", 1024),
    ("-2 ** 2", -4),  # ** binds tighter than unary minus
    ("--3", 3),
    ("1.5 * 4", 6.0),
    ("10 / 4", 2.5),
    ("2 ** -2", 0.25),
])
def test_arithmetic(expression, value):
    assert evaluate(expression) == value


def test_results_are_shown_exactly_or_to_twelve_digits():
    assert [format_value(evaluate(e)) for e in ("99*99", "8/4", "2/3")] == ["9801", "2", "0.666666666667"]


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('true')", "a call"),
    ("x + 1", "a name"),
    ("(1).__class__", "attribute access"),
    ("[1, 2][0]", "a subscript"),
    ("'a' * 3", "a str constant"),
    ("1 < 2", "a comparison"),
    ("1 and 2", "and/or"),
    ("lambda: 1", "a lambda"),
    ("True + 1", "a bool constant"),
    ("1j * 2", "a complex constant"),
    ("1 << 4000", "the operator LShift"),
    ("1 & 3", "the operator BitAnd"),
])
def test_anything_but_arithmetic_is_refused_by_name(expression, reason):
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expression)


@pytest.mark.parametrize("expression, reason", [
    ("9 ** 9 ** 9", "exponent"),  # 9**9 = 387420489 > MAX_EXPONENT: refused before the outer power runs
    ("10 ** 1000 * 10 ** 1000", "too large"),  # each factor has 3322 bits; 6644 > MAX_BITS + 1
    ("16 ** 1000", "too large"),  # bound checked as bit_length(16) * 1000 = 5000 > MAX_BITS
    ("10.0 ** 400", "too large"),  # float pow overflows (1e400 > 1.8e308)
    ("1e308 * 10", "not a finite"),  # float multiplication gives inf rather than raising
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("(-8) ** 0.5", "fractional power"),
    ("(" * 300 + "1" + ")" * 300, "characters long"),
    ("1 +", "not an arithmetic expression"),
    ("", "not an arithmetic expression"),
])
def test_sizes_are_bounded_before_computing(expression, reason):
    start = time.perf_counter()
    with pytest.raises(CalculatorError, match=reason):
        evaluate(expression)
    assert time.perf_counter() - start < 0.5


def test_values_within_the_bounds_are_answered():
    assert evaluate("8 ** 1000") == 2 ** 3000  # bit_length(8) * 1000 = 4000 <= MAX_BITS
    assert evaluate("2 ** 1000 ** 1") == 2 ** 1000  # 1000 ** 1 = 1000 <= MAX_EXPONENT
    assert 1.2e176 < evaluate("1.5 ** 1000") < 1.3e176  # 1000 * log10(1.5) = 176.09
    assert evaluate("(" * 50 + "1" + ")" * 50) == 1  # 101 characters: nesting within MAX_CHARS parses


def test_non_text_is_refused():
    with pytest.raises(CalculatorError, match="must be text"):
        evaluate(37)
