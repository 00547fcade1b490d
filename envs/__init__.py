"""Environments for multi-turn episodes (rlkit.episodes runs them over the engines): the API (envs.base), tool use
(envs.tools) and a safe calculator (envs.calculator). A leaf package: it imports rewards.sandbox, never rlkit."""

from envs.base import Environment, Message, StepResult
from envs.tools import ToolEnv, build_tools, format_tool_call, parse_tool_calls

__all__ = ["Environment", "Message", "StepResult", "ToolEnv", "build_tools", "format_tool_call", "parse_tool_calls"]
