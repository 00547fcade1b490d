"""Procedural logic puzzles with verifiers that check an answer against the puzzle's own constraints.

Three kinds, each a seeded generator and a checker:
- knights: Knights-and-Knaves (knights always tell the truth, knaves always lie); the answer assigns a role to
  everyone and must make every statement's truth match its speaker's role.
- sudoku: 4x4 or 9x9; the answer grid must keep the givens and fill every row, column and box with 1..n.
- countdown: reach the target with + - * / using each given number exactly once.

Generators keep only puzzles with exactly one solution (knights, sudoku) or a known one (countdown), but the
checkers never compare with a stored solution, so any answer that satisfies the constraints scores.
The sample's `gold` is `Puzzle.gold` (plain JSON); `LogicReward` dispatches on `gold["kind"]`.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.format import answer_span
from rlkit.rewards.pyparse import parse

NAMES = ["Alice", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana"]
MAX_ANSWER_CHARS = 10_000  # a verifier reads an answer, not a novel: longer is a format error


@dataclass(frozen=True)
class Puzzle:
    prompt: str  # the question for the model
    gold: dict[str, Any]  # what the checker needs (JSON), goes into Sample.gold
    solution: str  # one answer the checker accepts (for SFT data and tests), never used to check


# ---- Knights and Knaves -----------------------------------------------------------------------------------
# A claim is JSON: ["is", person, role] | ["and"|"or", a, b] | ["same", p, q] | ["count", n_knights]


def _truth(claim: list, roles: tuple[bool, ...]) -> bool:
    """Whether `claim` holds when roles[i] is True for knights."""
    op = claim[0]
    if op == "is":
        return roles[claim[1]] == (claim[2] == "knight")
    if op == "and":
        return _truth(claim[1], roles) and _truth(claim[2], roles)
    if op == "or":
        return _truth(claim[1], roles) or _truth(claim[2], roles)
    if op == "same":
        return roles[claim[1]] == roles[claim[2]]
    if op == "count":
        return sum(roles) == claim[1]
    raise ValueError(f"unknown claim {op!r}")


def _say(claim: list, names: list[str], speaker: int) -> str:
    who = lambda i: "I" if i == speaker else names[i]  # noqa: E731
    op = claim[0]
    if op == "is":
        verb = "am" if claim[1] == speaker else "is"
        return f"{who(claim[1])} {verb} a {claim[2]}"
    if op in ("and", "or"):
        return f"{_say(claim[1], names, speaker)} {op} {_say(claim[2], names, speaker)}"
    if op == "same":
        return f"{who(claim[1])} and {who(claim[2])} are the same kind"
    return f"exactly {claim[1]} of us {'is a knight' if claim[1] == 1 else 'are knights'}"


def _random_claim(rng: random.Random, n: int, speaker: int) -> list:
    others = [i for i in range(n) if i != speaker]
    role = lambda: rng.choice(["knight", "knave"])  # noqa: E731
    kind = rng.choice(["is", "is", "and", "or", "same", "count"])
    if kind in ("and", "or") and len(others) >= 2:
        a, b = rng.sample(others, 2)  # two different people: "B is a knave or B is a knave" says nothing new
        return [kind, ["is", a, role()], ["is", b, role()]]
    if kind in ("is", "and", "or"):
        return ["is", rng.choice(others), role()]
    if kind == "same":
        return ["same", *rng.sample(range(n), 2)]
    return ["count", rng.randint(1, n)]


def knights_puzzle(seed: int, people: int = 3) -> Puzzle:
    """A puzzle whose statements fit exactly one assignment of roles."""
    rng = random.Random(seed)
    names = rng.sample(NAMES, people)
    while True:
        claims = [_random_claim(rng, people, i) for i in range(people)]
        fits = [r for r in itertools.product([True, False], repeat=people)
                if all(_truth(c, r) == r[i] for i, c in enumerate(claims))]
        if len(fits) == 1:
            break
    said = " ".join(f'{names[i]} says: "{_say(c, names, i)}."' for i, c in enumerate(claims))
    prompt = (f"On an island every inhabitant is a knight, who always tells the truth, or a knave, who always lies. "
              f"{said} Who is a knight and who is a knave? Answer with one line per person, e.g. 'Name: knight'.")
    solution = "\n".join(f"{name}: {'knight' if role else 'knave'}" for name, role in zip(names, fits[0]))
    return Puzzle(prompt, {"kind": "knights", "names": names, "claims": claims}, solution)


def check_knights(gold: dict, answer: str) -> tuple[Verdict, str]:
    names = gold["names"]
    # "Name: knight", "**Name** is a knave"; a hedge ("a knight or a knave") does not count as an answer
    pattern = re.compile(rf"\b({'|'.join(map(re.escape, names))})\b[\s*_]*(?:is|:|=|-|\u2014)[\s*_]*(?:an?\s+)?"
                         r"(knight|knave)\b(?!\s*(?:or|/|and)\s*(?:an?\s+)?kn)", re.IGNORECASE)
    given: dict[str, str] = {}
    for name, role in pattern.findall(answer):
        given[name.lower()] = role.lower()  # the last statement about a person is the answer, as with numbers
    if not given:
        return Verdict.FORMAT_ERROR, "no 'Name: knight/knave' lines"
    if len(given) < len(names):
        return Verdict.WRONG, "not everyone has a role"
    roles = tuple(given[n.lower()] == "knight" for n in names)
    for i, claim in enumerate(gold["claims"]):
        if _truth(claim, roles) != roles[i]:
            return Verdict.WRONG, f"{names[i]}'s statement does not fit {'a knight' if roles[i] else 'a knave'}"
    return Verdict.CORRECT, ""


# ---- Sudoku -----------------------------------------------------------------------------------------------


def _box(size: int) -> int:
    return {4: 2, 9: 3}[size]


def _candidates(grid: list[int], size: int, cell: int) -> set[int]:
    r, c, b = divmod(cell, size) + (_box(size),)
    used = {grid[r * size + k] for k in range(size)} | {grid[k * size + c] for k in range(size)}
    br, bc = r - r % b, c - c % b
    used |= {grid[(br + i) * size + bc + j] for i in range(b) for j in range(b)}
    return set(range(1, size + 1)) - used


def _solve(grid: list[int], size: int, limit: int, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` completions of `grid` (0 = empty), by backtracking on the most constrained cell."""
    empty = [i for i, v in enumerate(grid) if v == 0]
    if not empty:
        return [list(grid)]
    cell = min(empty, key=lambda i: len(_candidates(grid, size, i)))
    options = sorted(_candidates(grid, size, cell))
    if rng is not None:
        rng.shuffle(options)
    found: list[list[int]] = []
    for value in options:
        grid[cell] = value
        found += _solve(grid, size, limit - len(found), rng)
        grid[cell] = 0
        if len(found) >= limit:
            break
    return found


def sudoku_puzzle(seed: int, size: int = 4, holes: int | None = None) -> Puzzle:
    """A grid with `holes` blanks (default: half the cells for 4x4, 45 for 9x9) and a unique completion."""
    rng = random.Random(seed)
    full = _solve([0] * size * size, size, 1, rng)[0]
    grid = list(full)
    target = holes if holes is not None else (size * size // 2 if size == 4 else 45)
    for cell in rng.sample(range(size * size), size * size):
        if sum(v == 0 for v in grid) >= target:
            break
        kept, grid[cell] = grid[cell], 0
        if len(_solve(list(grid), size, 2)) != 1:
            grid[cell] = kept  # this blank would allow a second solution
    rows = "\n".join(" ".join(str(v) if v else "." for v in grid[r * size:(r + 1) * size]) for r in range(size))
    prompt = (f"Solve this {size}x{size} Sudoku: fill the dots so every row, column and {_box(size)}x{_box(size)} box "
              f"holds each of 1-{size} once. Answer with the full grid, one row per line.\n{rows}")
    solution = "\n".join(" ".join(map(str, full[r * size:(r + 1) * size])) for r in range(size))
    return Puzzle(prompt, {"kind": "sudoku", "size": size, "givens": grid}, solution)


def _read_grid(answer: str, size: int) -> list[int] | None:
    lines = [re.sub(r"(?i)^\s*row\s*\d+\s*[:.)-]", "", line) for line in answer.splitlines()]
    rows = [d for d in (re.findall(r"\d", line) for line in lines) if len(d) == size]
    # the last `size` rows: a reply may restate the puzzle before the answer
    digits = [d for row in rows[-size:] for d in row] if len(rows) >= size else re.findall(r"\d", answer)
    return [int(d) for d in digits] if len(digits) == size * size else None


def check_sudoku(gold: dict, answer: str) -> tuple[Verdict, str]:
    size, givens = gold["size"], gold["givens"]
    grid = _read_grid(answer, size)
    if grid is None:
        return Verdict.FORMAT_ERROR, f"no {size}x{size} grid of digits"
    if any(g and g != v for g, v in zip(givens, grid)):
        return Verdict.WRONG, "a given digit was changed"
    b, full = _box(size), set(range(1, size + 1))
    rows = [grid[r * size:(r + 1) * size] for r in range(size)]
    cols = [grid[c::size] for c in range(size)]
    boxes = [[grid[(r + i) * size + c + j] for i in range(b) for j in range(b)]
             for r in range(0, size, b) for c in range(0, size, b)]
    for label, groups in (("row", rows), ("column", cols), ("box", boxes)):
        for k, group in enumerate(groups):
            if set(group) != full:
                return Verdict.WRONG, f"{label} {k + 1} does not hold 1-{size} once each"
    return Verdict.CORRECT, ""


# ---- Countdown --------------------------------------------------------------------------------------------

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}
_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def countdown_puzzle(seed: int, numbers: int = 4) -> Puzzle:
    """Numbers and a target reached by a random expression over all of them (integer steps, all positive)."""
    rng = random.Random(seed)
    while True:
        pool = [rng.choice([25, 50, 75, 100]) if rng.random() < 0.25 else rng.randint(1, 10) for _ in range(numbers)]
        items = [(Fraction(v), str(v)) for v in pool]
        while len(items) > 1:
            (a, ea), (b, eb) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
            op = rng.choice(list(_OPS))
            if op is ast.Div and (b == 0 or a % b):
                op = ast.Add
            if op is ast.Sub and a < b:
                (a, ea), (b, eb) = (b, eb), (a, ea)
            items.append((_OPS[op](a, b), f"({ea} {_SYMBOL[op]} {eb})"))
        value, expression = items[0]
        if value.denominator == 1 and 10 <= value <= 999:
            break
    target = int(value)
    prompt = (f"Using the numbers {pool}, each exactly once, and + - * / with parentheses, make {target}. "
              "Answer with the expression only.")
    return Puzzle(prompt, {"kind": "countdown", "numbers": pool, "target": target}, expression[1:-1])


def _evaluate(node: ast.expr, used: list[int]) -> Fraction:
    """The value of an expression made only of integers and + - * / (anything else raises ValueError)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"'{ast.unparse(node)[:40]}' is not a number or + - * /")


def check_countdown(gold: dict, answer: str) -> tuple[Verdict, str]:
    text = re.sub(r"(?<=[\d)\s])[x\u00d7](?=[\s\d(])", "*", answer).replace("\u00f7", "/").strip().strip("$").strip()
    sides = [s for s in text.split("=") if re.search(r"[-+*/]", s)]
    if not sides or len(sides[0]) > 500:
        return Verdict.FORMAT_ERROR, "no arithmetic expression"
    try:
        tree = parse(sides[0].strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # e.g. too many nested parentheses
        return Verdict.FORMAT_ERROR, "the expression does not parse"
    used: list[int] = []
    try:
        value = _evaluate(tree.body, used)
    except ValueError as e:
        return Verdict.WRONG, str(e)
    except ZeroDivisionError:
        return Verdict.WRONG, "division by zero"
    if sorted(used) != sorted(gold["numbers"]):
        return Verdict.WRONG, f"uses {sorted(used)}, not each of {sorted(gold['numbers'])} once"
    if value != gold["target"]:
        return Verdict.WRONG, f"makes {value}, not {gold['target']}"
    return Verdict.CORRECT, ""


# ---- Reward -----------------------------------------------------------------------------------------------

GENERATORS = {"knights": knights_puzzle, "sudoku": sudoku_puzzle, "countdown": countdown_puzzle}
CHECKERS = {"knights": check_knights, "sudoku": check_sudoku, "countdown": check_countdown}


class LogicReward:
    """`correct` when the answer satisfies the puzzle in `gold` (a `Puzzle.gold`), else `wrong`.

    >>> p = countdown_puzzle(seed=0)
    >>> LogicReward().score(Sample(p.prompt, f"<answer>{p.solution}</answer>", p.gold)).verdict.value
    'correct'
    """

    def __init__(self, correct: float = 1.0, wrong: float = 0.0):
        self.correct, self.wrong = correct, wrong

    def score(self, sample: Sample) -> RewardResult:
        gold = sample.gold if isinstance(sample.gold, dict) else {}
        if gold.get("kind") not in CHECKERS:
            raise ValueError(f"logic gold needs 'kind' in {sorted(CHECKERS)}, got {str(sample.gold)[:80]!r}")
        answer = answer_span(sample.completion)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            return RewardResult(self.wrong, Verdict.FORMAT_ERROR, info={"reason": "no answer"})
        verdict, reason = CHECKERS[gold["kind"]](gold, answer)
        score = self.correct if verdict == Verdict.CORRECT else self.wrong
        return RewardResult(score, verdict, info={"reason": reason})
