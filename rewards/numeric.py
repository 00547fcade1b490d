"""Numbers as models write them, read exactly (docs/rewards.md, "Normalisation" and "Comparison").

`parse_number` reads one written number into a Fraction, or None when the text is not exactly one number:
thousands separators only in groups of three (",", a thin or no-break space, LaTeX "\\," or "{,}", one kind per
number), a decimal point, a leading dot (".5" is 0.5), a sign (also U+2212), a fraction (3/4, \\frac{3}{4}),
scientific notation (1.2e6, 1.2 \\times 10^{6}), a currency sign before, a percent sign or unit words after,
full-width and other Unicode digits. Nothing else: no underscores ("10_2"), no merged lists ("1, 2").
`numbers_equal` compares exactly when the gold has a finite decimal form, else within a relative 1e-6.
"""

from __future__ import annotations

import re
import unicodedata
from fractions import Fraction

MAX_EXPONENT = 400  # |n| in 10^n; beyond, no answer a reward compares is meant
REL_TOL = Fraction(1, 10**6)  # only for golds without a finite decimal form (1/3)

THIN = "\ue000"  # every thin or no-break space, and LaTeX's spacing commands, become this (NFKC-stable) character
_SPACES = re.compile(r"\\[,;:! ]|~|[\u00a0\u2007\u2009\u202f\u2002-\u2006\u2008\u200a]")
_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
# one number, thousands separators in groups of three only (one kind per number: checked in _decimal)
_DIGITS = r"(?:\d{1,3}(?:[,\ue000 ]\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_PLAIN = re.compile(rf"(-?)({_DIGITS})")
_FRACTION = re.compile(r"(-?)(?:\\[dt]?frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))")
_TIMES = r"(?:\\times|\\cdot|[×·⋅*x])"
_SCI = re.compile(rf"(-?(?:{_DIGITS}))\s*(?:[eE]([+-]?\d+)|{_TIMES}\s*10\s*\^\s*\{{?\s*([+-]?\d+)\s*\}}?)")
_CURRENCY = re.compile(r"^(-?)\s*(?:\\\$|\$|£|€|¥|USD)\s*")
_SIMPLE = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
_UNIT = re.compile(r"[A-Za-z]+\.?")


def canonical_text(text: str) -> str:
    """A whole reply in one form, in linear time: thin and no-break spaces and LaTeX spacing commands to THIN,
    full-width forms to ASCII (NFKC), other Unicode digits to ASCII, U+2212 to "-", {,} to ","."""
    text = _SPACES.sub(THIN, text)
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
        text = "".join(str(unicodedata.digit(c)) if c.isdigit() and not c.isascii() else c for c in text)
        text = text.replace("\u2212", "-")
    return text.replace("{,}", ",")


def canonical(text: str) -> str:
    """One answer: canonical_text, then \\text{...} to its content, $...$, \\(...\\) and \\[...\\] dropped."""
    text = _TEXT.sub(r"\1", canonical_text(text))
    text = text.strip().strip("$").strip()
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(opening) and text.endswith(closing):
            text = text[2:-2].strip()
    return text


def parse_number(text: str) -> Fraction | None:
    """The number `text` is, exactly, or None.

    >>> [parse_number(t) for t in ("1,234", "1\\\\,234", ".5", "3/4", "1.2 \\\\times 10^{3}", "42 apples", "50%")]
    [Fraction(1234, 1), Fraction(1234, 1), Fraction(1, 2), Fraction(3, 4), Fraction(1200, 1), Fraction(42, 1), Fraction(50, 1)]
    >>> [parse_number(t) for t in ("10_2", "1, 2", "12,34", "2+3", "x")]
    [None, None, None, None, None]
    """
    if len(text) < 4000 and _SIMPLE.fullmatch(text):  # the common case, fast
        return Fraction(text)
    text = canonical(text)
    if len(text) > 5000:
        return None
    match = _CURRENCY.match(text)
    sign = ""
    if match:
        sign, text = match.group(1), text[match.end():]
    body = _strip_units(text)
    if not body:
        return None
    try:
        if m := _PLAIN.fullmatch(body):
            value = _decimal(m.group(2))
            return -value if (m.group(1) == "-") != (sign == "-") else value
        if m := _FRACTION.fullmatch(body):
            top, bottom = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
            if int(bottom) == 0:
                return None
            value = Fraction(int(top), int(bottom))
            return -value if (m.group(1) == "-") != (sign == "-") else value
        if m := _SCI.fullmatch(body):
            exponent = int(m.group(2) or m.group(3))
            if abs(exponent) > MAX_EXPONENT:
                return None
            value = parse_number(m.group(1)) * Fraction(10) ** exponent
            return -value if sign == "-" else value
    except (ValueError, TypeError, ZeroDivisionError):  # e.g. more digits than int() reads
        return None
    return None


def _strip_units(text: str) -> str:
    """`text` without a full stop, percent sign and up to 4 unit words after the number ("42 apples.")."""
    words = text.rstrip(" .").split()
    for _ in range(4):
        if len(words) > 1 and _UNIT.fullmatch(words[-1]):
            words.pop()
    body = " ".join(words)
    for percent in ("\\%", "%"):
        body = body[: -len(percent)].rstrip() if body.endswith(percent) else body
    return body.rstrip(THIN + " ")


def _decimal(digits: str) -> Fraction:
    if sum(sep in digits for sep in (",", THIN, " ")) > 1:
        raise ValueError("mixed thousands separators")
    return Fraction(digits.replace(",", "").replace(THIN, "").replace(" ", ""))


def numbers_equal(predicted: Fraction, gold: Fraction) -> bool:
    """Exact for a gold with a finite decimal form (integers, 12.25); within a relative REL_TOL for any other
    (1/3, which no decimal answer can equal exactly).

    >>> numbers_equal(Fraction(1234567891), Fraction(1234567890)), numbers_equal(Fraction("0.3333334"), Fraction(1, 3))
    (False, True)
    >>> numbers_equal(Fraction(10000), Fraction("10000.01")), numbers_equal(Fraction("12.250"), Fraction("12.25"))
    (False, True)
    """
    denominator = gold.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator == 1:
        return predicted == gold
    return abs(predicted - gold) <= REL_TOL * max(1, abs(gold))
