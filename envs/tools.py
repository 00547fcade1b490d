"""Tool use: the model writes tool calls in its chat template's convention, the environment runs them and answers
with each tool's output.

The default convention is Qwen2.5's and Hermes': a JSON object with "name" and "arguments" between
`<tool_call>` and `</tool_call>`; the answer is a `tool` message (a chat template renders it, Qwen's inside
`<tool_response>`; the plain format of rlkit.data.chat wraps it so). An assistant message without a tool call is the
final answer and ends the episode.

Errors are turns, never crashes: a malformed call (bad JSON, no name, arguments not an object, an unclosed tag),
an unknown tool, bad arguments, a tool's own error and a tool past its time limit each come back to the model as
`error: ...` in the tool message, and are counted (`tool_errors`).

Tools: `calculator` (rlkit.envs.calculator: safe arithmetic) and `python` (rlkit.rewards.sandbox: bubblewrap, no network,
per-call wall-clock, CPU and memory limits; its stdout is the answer).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from rlkit.envs.base import Environment, StepResult
from rlkit.envs.calculator import CalculatorError, evaluate, format_value

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_CALLS = 8  # per assistant message; more is an error (each call costs a sandbox run)


class ToolError(RuntimeError):
    """A tool could not answer (bad arguments, its own error, its time limit); the message goes to the model."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""  # why the call could not be read ("" for a well-formed call)


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A tool call as the model writes it (Qwen/Hermes).

    >>> format_tool_call("calculator", {"expression": "37*58"})
    '<tool_call>{"name": "calculator", "arguments": {"expression": "37*58"}}</tool_call>'
    """
    return f"<tool_call>{json.dumps({'name': name, 'arguments': dict(arguments)})}</tool_call>"


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every tool call in an assistant message, in order; a call that cannot be read carries its `error`.

    >>> parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>')
    [ToolCall(name='calculator', arguments={'expression': '1+2'}, error='')]
    >>> parse_tool_calls("it is 3"), parse_tool_calls('<tool_call>{"name": "calc"')[0].error
    ([], 'a <tool_call> without its closing </tool_call>')
    """
    calls = [_parse_one(body) for body in _CALL.findall(text)]
    rest = _CALL.sub("", text)
    if "<tool_call>" in rest:
        calls.append(ToolCall("", {}, "a <tool_call> without its closing </tool_call>"))
    elif "tool_call" in rest:  # e.g. "<tool_cal>{...}</tool_call>": a call the model meant, not a final answer
        calls.append(ToolCall("", {}, "a malformed <tool_call> tag; write <tool_call>{...}</tool_call>"))
    if len(calls) > MAX_CALLS:
        return [ToolCall("", {}, f"{len(calls)} tool calls in one message; at most {MAX_CALLS}")]
    return calls


def _parse_one(body: str) -> ToolCall:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as e:
        return ToolCall("", {}, f"the tool call is not valid JSON ({str(e).splitlines()[0][:80]})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return ToolCall("", {}, 'the tool call must be a JSON object {"name": ..., "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's convention: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], {}, "the tool call's arguments must be a JSON object")
    return ToolCall(call["name"], arguments)


class Calculator:
    """Arithmetic on numbers: {"expression": "37*58"} -> "2146" (rlkit.envs.calculator; no eval)."""

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            raise ToolError('calculator needs {"expression": "<arithmetic>"}')
        try:
            return format_value(evaluate(expression))
        except CalculatorError as e:
            raise ToolError(str(e)) from None


class Python:
    """Runs {"code": "..."} in the bubblewrap sandbox of the code reward and answers with its stdout.

    `wall_s` bounds each call (the program is killed at it), `memory_mb` its address space; without bubblewrap the
    tool refuses to start (rlkit.rewards.sandbox.SandboxUnavailable) rather than run code unsandboxed."""

    def __init__(self, wall_s: float = 5.0, memory_mb: int = 256, max_output_chars: int = 2000, python: str = ""):
        from rlkit.rewards.sandbox import Sandbox, SandboxLimits

        # the CPU limit a second past the wall clock: a busy loop must meet the wall clock first, which the answer
        # names as the time limit (at an equal CPU limit the kernel's SIGKILL won about as often: "exit code -9")
        limits = SandboxLimits(wall_s=wall_s + 1.0, cpu_s=math.ceil(wall_s) + 1, memory_mb=memory_mb)
        self.sandbox, self.wall_s, self.max_output_chars = Sandbox(limits, python), wall_s, max_output_chars

    def __call__(self, arguments: Mapping[str, Any]) -> str:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError('python needs {"code": "<a program that prints its answer>"}')
        result = self.sandbox.run({"mode": "stdio", "code": code, "inputs": [""], "test_timeout_s": self.wall_s,
                                   "max_stdout": self.max_output_chars})
        record = next((r for r in result.records if r.get("test") == 0), None)
        if result.timed_out or (record is not None and record.get("timeout")):
            raise ToolError(f"the program ran past its time limit of {self.wall_s:g} s and was killed")
        if record is None or not result.done:
            raise ToolError("the program was killed (memory, output or process limit)")
        stdout = str(record.get("stdout", ""))
        if record.get("exit") != 0:
            raise ToolError(f"the program exited with code {record.get('exit')}; its output: {stdout[-300:]}")
        return stdout


TOOLS: dict[str, Callable[..., Callable[[Mapping[str, Any]], str]]] = {"calculator": Calculator, "python": Python}


def build_tools(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """The named built-in tools, each made once with its `options` (e.g. {"python": {"wall_s": 2}})."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; built-in tools: {', '.join(TOOLS)}")
    return {name: TOOLS[name](**dict((options or {}).get(name, {}))) for name in names}


class ToolEnv(Environment):
    """Runs the tool calls of each assistant message; a message without one is the final answer.

    Stateless across steps, so one instance serves every episode (the tools, e.g. a sandbox, are made once).
    `error_penalty` is added to the reward (as the part `tool_errors`) once per failed call.

    >>> env = ToolEnv({"calculator": Calculator()})
    >>> r = env.step(format_tool_call("calculator", {"expression": "37*58"}))
    >>> r.messages, r.done, r.tool_calls, r.tool_errors
    ([{'role': 'tool', 'content': '2146'}], False, 1, 0)
    >>> env.step("2146").done
    True
    """

    def __init__(self, tools: Mapping[str, Callable[[Mapping[str, Any]], str]], max_output_chars: int = 1000,
                 error_penalty: float = 0.0):
        self.tools, self.max_output_chars, self.error_penalty = dict(tools), max_output_chars, error_penalty

    def step(self, assistant_message: str) -> StepResult:
        calls = parse_tool_calls(assistant_message)
        if not calls:
            return StepResult(done=True)
        messages, errors, start = [], 0, time.perf_counter()
        for call in calls:
            output, ok = self.run(call)
            errors += not ok
            messages.append({"role": "tool", "content": output})
        parts = {"tool_errors": self.error_penalty * errors} if self.error_penalty else {}
        return StepResult(messages, parts, False, len(calls), errors, time.perf_counter() - start)

    def run(self, call: ToolCall) -> tuple[str, bool]:
        """(the tool message's text, whether the call succeeded)."""
        if call.error:
            return f"error: {call.error}", False
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool '{call.name[:40]}'; tools: {', '.join(self.tools)}", False
        try:
            output = tool(call.arguments)
        except ToolError as e:
            return f"error: {e}", False
        except Exception as e:  # a tool's bug is the model's turn to see, not the run's crash; counted as an error
            return f"error: {call.name} failed: {type(e).__name__}: {str(e)[:200]}", False
        if len(output) > self.max_output_chars:
            output = output[: self.max_output_chars] + f"... [{len(output) - self.max_output_chars} characters cut]"
        return output, True
