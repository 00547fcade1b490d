"""Environments for multi-turn episodes (rlkit.algorithms.episodes runs them over the engines; a leaf, installed as
rlkit.envs): the API (rlkit.envs.base), tool use (rlkit.envs.tools) and a safe calculator (rlkit.envs.calculator).
Imports rlkit.rewards.sandbox (the python tool), never another part of rlkit."""

from rlkit.envs.base import Environment, Message, StepResult
from rlkit.envs.tools import ToolEnv, build_tools, format_tool_call, parse_tool_calls

__all__ = ["Environment", "Message", "StepResult", "ToolEnv", "build_tools", "format_tool_call", "parse_tool_calls"]
