"""A safe calculator: arithmetic on numbers, parsed with `ast` and evaluated node by node, never with `eval`.

Allowed: int and float literals, + - * / // % **, unary + and -, parentheses. Everything else (names, calls,
attribute access, subscripts, strings, comparisons, lambdas...) is refused with a message naming it. Sizes are
bounded before each operation runs, so no input can stall the process: an exponent above MAX_EXPONENT, an integer
result over MAX_BITS bits, or an expression over MAX_CHARS characters is an error, not a long computation.
"""

from __future__ import annotations

import ast
import math
import operator

from rlkit.rewards.pyparse import parse

MAX_CHARS = 200  # longer expressions are refused unread (they also bound the parser's nesting)
MAX_EXPONENT = 1000  # |b| in a ** b
MAX_BITS = 4096  # integer operands and results (about 1233 decimal digits)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or its value is out of bounds; the message says which."""


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression.

    >>> evaluate("37*58"), evaluate("-(2+3)**2"), evaluate("7/2"), evaluate("7//2"), evaluate("2**-1")
    (2146, -25, 3.5, 3, 0.5)
    >>> try:
    ...     evaluate("__import__('os')")
    ... except CalculatorError as e:
    ...     print(e)
    only numbers and + - * / // % ** are allowed, not a call
    """
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be text, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression is {len(expression)} characters long; at most {MAX_CHARS}")
    try:
        tree = parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"not an arithmetic expression ({type(e).__name__})") from None
    return _value(tree.body)


def format_value(value: int | float) -> str:
    """How a result is shown to the model: integers exactly, floats with up to 12 significant digits.

    >>> format_value(2146), format_value(3.5), format_value(1 / 3), format_value(6 / 3)
    ('2146', '3.5', '0.333333333333', '2')
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # not bool, str, complex
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        _check_operation(node.op, left, right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("the result is too large") from None
    raise CalculatorError(f"only numbers and + - * / // % ** are allowed, not {_describe(node)}")


def _check_operation(op: ast.operator, left: int | float, right: int | float) -> None:
    """Refuse an operation whose result would be too large to compute quickly, before computing it."""
    if isinstance(op, ast.Pow):
        if abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"the exponent {right} is above {MAX_EXPONENT}")
        if isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > MAX_BITS:
            raise CalculatorError("the result is too large")
        if isinstance(left, (int, float)) and left < 0 and isinstance(right, float) and not right.is_integer():
            raise CalculatorError("a negative number to a fractional power is not a real number")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_BITS + 1:
            raise CalculatorError("the result is too large")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise CalculatorError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is not a finite number")
    return value


def _describe(node: ast.AST) -> str:
    names = {ast.Name: "a name", ast.Call: "a call", ast.Attribute: "attribute access", ast.Subscript: "a subscript",
             ast.Compare: "a comparison", ast.Lambda: "a lambda", ast.BoolOp: "and/or"}
    if isinstance(node, ast.Constant):
        return f"a {type(node.value).__name__} constant"
    if isinstance(node, ast.BinOp):
        return f"the operator {type(node.op).__name__}"
    return names.get(type(node), f"a {type(node).__name__} expression")
