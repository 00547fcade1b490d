"""The environment API: as small as the reward API, and plugged in the same way (`env.import_path`, `env.kwargs`).

An episode is a conversation between the policy and an environment. The environment opens it (`reset`), then
answers each assistant message (`step`) with new messages (a tool's output, a judge's feedback), named reward parts
that are added to the recipe's reward, and whether the episode is over. The rollout loop (rlkit.algorithms.episodes) owns
tokens, batching, turn and token limits; an environment sees and returns text only.

Leaf package: imports nothing of rlkit (the problem is any object with `.prompt` and `.answer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

Message = Dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": text}


@dataclass(frozen=True)
class StepResult:
    """What an environment answers to one assistant message."""

    messages: List[Message] = field(default_factory=list)  # new turns shown to the policy (masked out of the loss)
    reward_parts: Mapping[str, float] = field(default_factory=dict)  # summed over the episode, added to the reward
    done: bool = True  # the last assistant message was the final answer
    tool_calls: int = 0  # tool calls this step made (for the episode's metrics)
    tool_errors: int = 0  # of which failed: malformed, unknown tool, bad arguments, a tool's error or time limit
    tool_seconds: float = 0.0  # wall-clock seconds spent in tools


class Environment:
    """The default environment: one answer and done (single-turn, what a recipe without `env` does).

    >>> env = Environment()
    >>> env.reset(object()), env.step("42").done
    ([], True)
    """

    def reset(self, problem: Any) -> List[Message]:
        """The conversation's opening turns (system, user), rendered as the episode's prompt instead of the
        problem's; [] (the default) keeps the prompt the data section rendered."""
        return []

    def step(self, assistant_message: str) -> StepResult:
        """React to the policy's latest message (its text, without the stop token)."""
        return StepResult()
