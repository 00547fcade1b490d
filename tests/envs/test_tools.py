"""The tool-call parser and ToolEnv: good calls, malformed ones, unknown tools, and a python program that hangs
(killed at its limit). Every failure is a tool message starting with "error:" and a counted error, never a raise."""

import shutil
import time

import pytest

from rlkit.envs.tools import Calculator, ToolCall, ToolEnv, build_tools, format_tool_call, parse_tool_calls

CALL = format_tool_call("calculator", {"expression": "37*58"})


def test_a_good_call_round_trips():
    assert CALL == '<tool_call>{"name": "calculator", "arguments": {"expression": "37*58"}}</tool_call>'
    assert parse_tool_calls("Let me compute. " + CALL) == [ToolCall("calculator", {"expression": "37*58"})]


def test_several_calls_and_openai_string_arguments():
    text = CALL + '\n<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>'
    assert [c.arguments for c in parse_tool_calls(text)] == [{"expression": "37*58"}, {"expression": "1+1"}]


@pytest.mark.parametrize("text, error", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>', "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "arguments must be a JSON object"),
    ('<tool_call>{"name": "calculator"', "without its closing"),
    ('<tool_cal>{"name": "calculator", "arguments": {}}</tool_call>', "malformed <tool_call> tag"),  # seen in SFT
    ("<tool_call>" + "[" * 100000 + "</tool_call>", "not valid JSON"),  # json's recursion limit, caught
    (CALL * 9, "at most 8"),
])
def test_malformed_calls_carry_an_error(text, error):
    calls = parse_tool_calls(text)
    assert calls[-1].error and error in calls[-1].error


def test_no_call_is_the_final_answer():
    result = ToolEnv({"calculator": Calculator()}).step("2146")
    assert result.done and result.messages == [] and result.tool_calls == 0


@pytest.mark.parametrize("text, message", [
    (CALL, "2146"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', "error: division by zero"),
    ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "error: calculator needs"),
    ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "error: unknown tool 'search'; tools: calculator"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}</tool_call>', "error: the tool call is"),
])
def test_every_failure_is_a_turn_and_a_counted_error(text, message):
    result = ToolEnv({"calculator": Calculator()}, error_penalty=-0.5).step(text)
    assert not result.done and result.tool_calls == 1
    assert result.messages[0]["role"] == "tool" and result.messages[0]["content"].startswith(message)
    failed = message.startswith("error")
    assert result.tool_errors == failed
    assert result.reward_parts == {"tool_errors": -0.5 * failed}  # the same key every step, so it averages


def test_a_buggy_tool_is_an_error_message_and_long_output_is_cut():
    def broken(arguments):
        raise KeyError("oops")

    env = ToolEnv({"broken": broken, "long": lambda a: "x" * 50}, max_output_chars=10)
    result = env.step(format_tool_call("broken", {}) + format_tool_call("long", {}))
    assert result.messages[0]["content"] == "error: broken failed: KeyError: 'oops'"
    assert result.messages[1]["content"] == "x" * 10 + "... [40 characters cut]"
    assert (result.tool_calls, result.tool_errors) == (2, 1)


def test_unknown_tool_names_fail_at_construction():
    with pytest.raises(ValueError, match="unknown tool"):
        build_tools(["calculator", "shell"])


needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


@needs_bwrap
def test_python_runs_in_the_sandbox_and_a_hang_is_killed_at_its_limit():
    env = ToolEnv(build_tools(["python"], {"python": {"wall_s": 1.0}}))
    ok = env.step(format_tool_call("python", {"code": "print(37 * 58)"}))
    assert ok.messages[0]["content"] == "2146\n" and ok.tool_errors == 0
    start = time.perf_counter()
    hung = env.step(format_tool_call("python", {"code": "while True:\n    pass"}))
    assert time.perf_counter() - start < 4.0  # wall_s 1 (the outer clock at 2 s), not forever
    assert hung.tool_errors == 1 and "time limit of 1 s" in hung.messages[0]["content"]
    crash = env.step(format_tool_call("python", {"code": "import socket; socket.create_connection(('1.1.1.1', 80))"}))
    assert crash.tool_errors == 1 and "exited with code 1" in crash.messages[0]["content"]
