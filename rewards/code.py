"""Code reward: run model-written Python against tests in the sandbox; decide pass/fail outside it.

Two test forms (the sample's `gold`):
- function: {"test": "def check(candidate): assert candidate(1) == 2 ...", "entry_point": "f", "prompt": code
  prefix} (HumanEval; module-level asserts calling `f` work too). Each assert is split before anything runs:
  the parts the parent can evaluate itself (literals, arithmetic, comparisons, abs/len/sorted/math.isclose...)
  stay here; only the rest (typically `candidate(...)` calls) goes into the sandbox, which reports their values.
  So an inline expected value never enters the sandbox, and an object whose __eq__ always returns True arrives
  as opaque data that equals nothing.
- stdio: {"inputs": [...], "outputs": [...]}: the program runs once per input; its stdout is compared here.

A pass needs a positive record for every assert (or test) and the harness's final record: exiting early
(os._exit(0) before the asserts), crashing or being killed fails. Running out of time or memory is the
solution's fault and scores as wrong, not as a verifier timeout; so does a program over `max_code_kb` (never
parsed), and a malformed record on the result channel (the solution forged one).
Inside the sandbox the tests run in a checker process and the solution in another, called over a pipe
(rewards/_harness.py), so expected values the tests compute at run time (a variable, a helper from the prompt)
do not depend on the solution either. Limitation: arguments travel as copies, so a test that checks how the
solution mutated an argument in place sees the checker's unchanged copy (it fails rather than passes).
"""

from __future__ import annotations

import ast
import functools
import math
import re
import types
from typing import Any

from rlkit.rewards._codec import Opaque, decode  # noqa: F401 (Opaque: the type decode gives what cannot travel)
from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.math import final_reply
from rlkit.rewards.pyparse import parse
from rlkit.rewards.sandbox import Sandbox, SandboxLimits, SandboxResult

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_SAFE_CALLS: dict[str, Any] = {f.__name__: f for f in (abs, round, len, sorted, set, frozenset, tuple, list, dict,
                                                      sum, min, max, int, float, str, bool, all, any)}
_MATH = types.SimpleNamespace(**{n: getattr(math, n)
                                  for n in ("fabs", "isclose", "sqrt", "floor", "ceil", "isnan", "isinf")})
_PARENT_NODES = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.UnaryOp, ast.BoolOp, ast.Compare,
                 ast.IfExp, ast.Subscript, ast.Slice)


def _split(node: ast.expr, leaves: list[ast.expr]) -> ast.expr:
    """The part of an assert the parent evaluates; every other subexpression becomes a leaf for the sandbox."""
    safe_call = isinstance(node, ast.Call) and not any(isinstance(a, ast.Starred) for a in node.args) and all(
        k.arg for k in node.keywords) and (
        (isinstance(node.func, ast.Name) and node.func.id in _SAFE_CALLS)
        or (isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "math" and hasattr(_MATH, node.func.attr)))
    # ** stays in the sandbox: a model-sized exponent must not stall the scorer process
    safe_binop = isinstance(node, ast.BinOp) and not isinstance(node.op, ast.Pow)
    starred = any(isinstance(c, ast.Starred) for c in ast.iter_child_nodes(node))
    if (isinstance(node, _PARENT_NODES) or safe_binop or safe_call) and not starred \
            and not (isinstance(node, ast.Dict) and None in node.keys):
        new = type(node)(**{f: getattr(node, f) for f in node._fields})
        for name, value in ast.iter_fields(node):
            if name == "func" or name == "ctx":
                continue
            if isinstance(value, ast.expr):
                setattr(new, name, _split(value, leaves))
            elif isinstance(value, list):
                setattr(new, name, [_split(v, leaves) if isinstance(v, ast.expr) else _keyword(v, leaves)
                                    if isinstance(v, ast.keyword) else v for v in value])
        return new
    if isinstance(node, ast.GeneratorExp):  # a generator cannot travel as data: the sandbox sends its items as a list
        node = ast.copy_location(ast.ListComp(elt=node.elt, generators=node.generators), node)
    leaves.append(node)
    return ast.Name(id=f"__leaf{len(leaves) - 1}", ctx=ast.Load())


def _keyword(kw: ast.keyword, leaves: list[ast.expr]) -> ast.keyword:
    return ast.keyword(arg=kw.arg, value=_split(kw.value, leaves))


class _Asserts(ast.NodeTransformer):
    """Replaces `assert test` by `__rlkit_assert(i, lambda: (leaf, ...))`; keeps the skeletons in the parent."""

    def __init__(self):
        self.skeletons: list[types.CodeType] = []

    def visit_Assert(self, node: ast.Assert) -> ast.stmt:
        leaves: list[ast.expr] = []
        skeleton = ast.fix_missing_locations(ast.Expression(_split(node.test, leaves)))
        self.skeletons.append(compile(skeleton, "<assert>", "eval"))
        thunk = ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                           body=ast.Tuple(elts=leaves, ctx=ast.Load()))
        call = ast.Call(ast.Name("__rlkit_assert", ast.Load()), [ast.Constant(len(self.skeletons) - 1), thunk], [])
        return ast.copy_location(ast.Expr(call), node)


@functools.lru_cache(maxsize=1024)
def prepare_tests(tests: str) -> tuple[str, tuple[types.CodeType, ...]]:
    """(the tests as sent into the sandbox, one parent-side skeleton per assert). Tests are trusted data."""
    rewriter = _Asserts()
    tree = ast.fix_missing_locations(rewriter.visit(parse(tests)))
    if not rewriter.skeletons:
        raise ValueError("the tests contain no assert statements")
    return ast.unparse(tree), tuple(rewriter.skeletons)


def assert_passes(skeleton: types.CodeType, values: list[Any]) -> bool:
    env = {"__builtins__": {}, "math": _MATH, **_SAFE_CALLS}
    env.update({f"__leaf{i}": v for i, v in enumerate(values)})
    try:
        return bool(eval(skeleton, env))
    except Exception:  # a type error on opaque data, a missing key...: the assert does not hold
        return False


def extract_code(completion: str) -> str:
    """The last fenced code block of the reply (after any </think>), else the whole reply."""
    reply = final_reply(completion)
    blocks = _FENCE.findall(reply)
    return blocks[-1] if blocks else reply


def _defines(code: str, name: str) -> bool | None:
    """Whether `code` defines `name` at top level; None when it does not parse."""
    try:
        tree = parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return any(isinstance(n, defs) and n.name == name for n in tree.body)


def normalise_output(text: str) -> list[str]:
    """Lines without trailing spaces, trailing blank lines dropped: the usual judge tolerance."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def judge_function(result: SandboxResult, skeletons: tuple[types.CodeType, ...]) -> tuple[int, str]:
    """(number of asserts that held every time they ran, the first reason for a failure or "")."""
    failed: set[int] = set()
    reached: set[int] = set()
    reason = ""
    for record in result.records:
        index = record.get("assert")
        if "error" in record:
            reason = reason or str(record["error"])[:300]
        if type(index) is not int or not 0 <= index < len(skeletons):
            continue
        reached.add(index)
        values = record.get("values")
        values = [decode(v) for v in values] if type(values) is list else None  # forged records are data too
        if values is None or not assert_passes(skeletons[index], values):
            failed.add(index)
            reason = reason or f"assert {index} failed"
    passed = len(reached - failed)
    if len(reached) < len(skeletons):
        reason = reason or f"only {len(reached)} of {len(skeletons)} asserts ran"
    return passed, reason


def judge_stdio(result: SandboxResult, outputs: list[str]) -> tuple[int, str]:
    passed, reason = 0, ""
    seen: set[int] = set()
    for record in result.records:
        index = record.get("test")
        if type(index) is not int or not 0 <= index < len(outputs) or index in seen:
            continue
        seen.add(index)
        if record.get("timeout"):
            reason = reason or f"test {index} ran out of time"
        elif record.get("exit") != 0:
            reason = reason or f"test {index} exited with {record.get('exit')}"
        elif normalise_output(str(record.get("stdout", ""))) != normalise_output(outputs[index]):
            reason = reason or f"test {index}: wrong output"
        else:
            passed += 1
    return passed, reason


class CodeReward:
    """`correct` when every test passes in the sandbox, else `wrong` (or the passed fraction with partial=True).

    >>> gold = {"test": "def check(candidate):\\n    assert candidate(2) == 4", "entry_point": "f"}
    >>> CodeReward().score(Sample("", "```python\\ndef f(x):\\n    return x * 2\\n```", gold)).verdict.value
    'correct'
    """

    def __init__(self, correct: float = 1.0, wrong: float = 0.0, partial: bool = False, wall_s: float = 3.0,
                 test_timeout_s: float = 2.0, memory_mb: int = 512, processes: int = 32, python: str = "",
                 max_code_kb: int = 256):
        limits = SandboxLimits(wall_s=wall_s, cpu_s=max(1, math.ceil(wall_s)), memory_mb=memory_mb,
                               processes=processes)
        self.sandbox = Sandbox(limits, python)  # fails here, before any sample, if bwrap cannot sandbox
        self.correct, self.wrong, self.partial = correct, wrong, partial
        self.test_timeout_s = test_timeout_s
        self.max_code_chars = max_code_kb << 10  # longer is wrong before parsing: it could outlast the deadline
        # the scorer's per-sample deadline must leave room for this (3 + 1 fits the default timeout_s of 5)
        self.budget_s = wall_s + 1.0

    def score(self, sample: Sample) -> RewardResult:
        gold = sample.gold if isinstance(sample.gold, dict) else {}
        code = extract_code(sample.completion)
        if not code.strip():
            return RewardResult(self.wrong, Verdict.FORMAT_ERROR, info={"reason": "no code"})
        if len(sample.completion) > self.max_code_chars:
            return self._result(0, 1, f"program over {self.max_code_chars >> 10} KiB", None)
        if "test" in gold and "entry_point" in gold:
            return self._function(code, sample, gold)
        if "inputs" in gold and "outputs" in gold:
            return self._stdio(code, gold)
        raise ValueError("code gold needs {'test', 'entry_point'} or {'inputs', 'outputs'}")

    def _function(self, code: str, sample: Sample, gold: dict) -> RewardResult:
        tests, skeletons = prepare_tests(gold["test"])
        prefix = gold.get("prompt", "")
        defines = _defines(code, gold["entry_point"])
        # A whole function comes after the prompt (which may hold imports and helpers); a bare body continues it.
        program = prefix + "\n" + code if defines else prefix + final_reply(sample.completion)
        if _defines(program, gold["entry_point"]) is None:
            return self._result(0, len(skeletons), "syntax error", None)
        result = self.sandbox.run({"mode": "function", "code": program, "tests": tests, "prefix": prefix,
                                   "entry_point": gold["entry_point"]})
        passed, reason = judge_function(result, skeletons)
        return self._result(passed, len(skeletons), reason, result)

    def _stdio(self, code: str, gold: dict) -> RewardResult:
        outputs = [str(o) for o in gold["outputs"]]
        result = self.sandbox.run({"mode": "stdio", "code": code, "inputs": [str(i) for i in gold["inputs"]],
                                   "test_timeout_s": self.test_timeout_s,
                                   "max_stdout": max(1024, 4 * max(map(len, outputs), default=0))})
        passed, reason = judge_stdio(result, outputs)
        return self._result(passed, len(outputs), reason, result)

    def _result(self, passed: int, total: int, reason: str, run: SandboxResult | None) -> RewardResult:
        if run is not None and not run.done:  # no final record: nothing it reported counts as a full pass
            reason = ("time limit" if run.timed_out else "output limit" if run.output_exceeded
                      else "malformed result record" if run.malformed
                      else f"the program ended before its tests finished (exit {run.returncode})")
        ok = run is not None and run.done and not reason and passed == total
        info = {"passed": passed, "total": total, "reason": reason}
        if ok:
            return RewardResult(self.correct, Verdict.CORRECT, info=info)
        fraction = passed / total if total else 0.0
        score = self.wrong + (self.correct - self.wrong) * fraction if self.partial else self.wrong
        return RewardResult(score, Verdict.WRONG, info=info)
