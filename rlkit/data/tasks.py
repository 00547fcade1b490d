"""What a stage trains on: problems (a prompt with a gold answer), conversations and preference pairs; the
synthetic verifiable arithmetic of the embedded default; and the batch sampler.

A problem has a prompt, a gold answer and a solution (the SFT target: the answer itself, or a worked solution
when the data has one; `data.abstain_rate` turns a share of synthetic training targets into "I don't know", so a
model can learn to say it). The synthetic held-out split is disjoint from training by construction.
`data.verification` turns the synthetic problems into training data for an LLM judge (rlkit.rewards.judge).
Files and hub datasets are read by rlkit.data.sources; rlkit.data.chat renders all of these into token ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Dict, Tuple, Union

from rlkit.recipe import DataConfig, RecipeError
from rlkit.rewards.honesty import ABSTAIN_PHRASE
from rlkit.envs.calculator import evaluate, format_value
from rlkit.envs.tools import format_tool_call
from rlkit.rewards.judge import DEFAULT_TEMPLATE, judge_prompt, score_tag


Message = Dict[str, str]  # {"role": "system" | "user" | "assistant" | "tool", "content": text}


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "12+345=": the question's text, what rewards and tables see
    answer: str  # gold answer, e.g. "357" ("" when the data has none: SFT only)
    solution: str  # SFT target text that follows the prompt
    task: str = ""
    messages: Tuple[Message, ...] = ()  # a conversational prompt (TRL), rendered instead of `prompt` when given
    prompt_ids: Tuple[int, ...] = ()  # the rendered prompt, filled in when the data is prepared (rlkit.data.prepare)
    # a tool-use trace after the prompt (assistant and tool turns, ending with the answer): the SFT target instead
    # of `solution`, rendered as rlkit.algorithms.episodes renders a rollout (data.tool_traces)
    trace: Tuple[Message, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """Conversational SFT data: every assistant turn from `first_trained` on is trained, nothing else."""

    messages: Tuple[Message, ...]
    first_trained: int = 0  # prompt-completion data: the completion's first message


@dataclass(frozen=True)
class Preference:
    """A preference pair (TRL's format): one prompt, a chosen and a rejected reply, each text or messages."""

    prompt: str
    chosen: Union[str, Tuple[Message, ...]]
    rejected: Union[str, Tuple[Message, ...]]
    messages: Tuple[Message, ...] = ()  # a conversational prompt, rendered instead of `prompt` when given
    margin: float = 0.0  # TRL's optional `margin` column: how far a reward model must rank chosen above rejected


@dataclass(frozen=True)
class Stepwise:
    """TRL's stepwise supervision (a process reward model's data): a prompt, a solution's steps, a label per step."""

    prompt: str
    steps: Tuple[str, ...]
    labels: Tuple[bool, ...]  # True: the step is correct
    messages: Tuple[Message, ...] = ()  # a conversational prompt, rendered instead of `prompt` when given


def _operands(rng: random.Random, task: str, max_digits: int) -> tuple[int, int]:
    def number(digits: int) -> int:
        return rng.randint(0, 10**digits - 1)

    if task == "add":
        return number(rng.randint(1, max_digits)), number(rng.randint(1, max_digits))
    if task in ("add_hard", "mul_hard"):  # both operands of max_digits (at least 2) digits (mul_hard: beyond the
        # quickstart model; add_hard: two-digit addition for a pretrained model, recipes/smollm2_arith.yaml)
        digits = max(2, max_digits)
        return rng.randint(10 ** (digits - 1), 10**digits - 1), rng.randint(10 ** (digits - 1), 10**digits - 1)
    # Multiplication by a single digit keeps the answer learnable by a tiny model in minutes.
    return number(rng.randint(1, max_digits)), rng.randint(0, 9)


def make_problem(rng: random.Random, task: str, max_digits: int) -> Problem:
    """One synthetic problem.

    >>> p = make_problem(random.Random(0), "add", 3)
    >>> int(p.answer) == eval(p.prompt[:-1])
    True
    """
    a, b = _operands(rng, task, max_digits)
    op, value = ("+", a + b) if task.startswith("add") else ("*", a * b)  # mul and mul_hard
    answer = str(value)
    return Problem(prompt=f"{a}{op}{b}=", answer=answer, solution=answer, task=task)


def _distinct_problems(cfg: DataConfig) -> int:
    """How many different prompts the synthetic tasks can produce (an upper bound: operands may repeat)."""
    hard = 9 * 10 ** (max(2, cfg.max_digits) - 1)
    per_task = {"add": (10**cfg.max_digits) ** 2, "mul": 10**cfg.max_digits * 10, "mul_hard": hard**2,
                "add_hard": hard**2}
    return sum(per_task[t] for t in set(cfg.tasks))


def synthetic_splits(cfg: DataConfig) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): held-out prompts never appear in training."""
    rng = random.Random(cfg.seed)
    held_out: dict[str, Problem] = {}
    if cfg.num_eval * 2 > _distinct_problems(cfg):
        raise RecipeError(
            f"data.num_eval: {cfg.num_eval} held-out problems would leave too few of the "
            f"{_distinct_problems(cfg)} distinct ones for training; lower it or raise data.max_digits"
        )
    while len(held_out) < cfg.num_eval:
        p = make_problem(rng, rng.choice(cfg.tasks), cfg.max_digits)
        held_out.setdefault(p.prompt, p)
    train: list[Problem] = []  # may repeat problems (small digit ranges), never a held-out one
    while len(train) < cfg.num_train:
        p = make_problem(rng, rng.choice(cfg.tasks), cfg.max_digits)
        if p.prompt not in held_out:
            train.append(p)
    if cfg.abstain_rate:  # its own stream, so the problems do not depend on the rate
        coin = random.Random(cfg.seed + 1)
        train = [replace(p, solution=ABSTAIN_PHRASE) if coin.random() < cfg.abstain_rate else p for p in train]
    if cfg.tool_traces:  # SFT on calling the calculator: the held-out problems stay plain prompts
        train = [replace(p, trace=tool_trace(p)) for p in train]
    if cfg.verification:  # judge-training examples over the same problems, each split its own stream
        wrong = cfg.verification_wrong_rate
        return (verification_problems(train, wrong, cfg.seed + 2),
                verification_problems(list(held_out.values()), wrong, cfg.seed + 3))
    return train, list(held_out.values())


def tool_trace(problem: Problem) -> Tuple[Message, ...]:
    """A synthetic episode that calls the calculator on the question and answers with its result.

    >>> [m["content"] for m in tool_trace(Problem("37*58=", "2146", "2146", "mul_hard"))]
    ['<tool_call>{"name": "calculator", "arguments": {"expression": "37*58"}}</tool_call>', '2146', '2146']
    """
    expression = problem.prompt.rstrip("=")
    return ({"role": "assistant", "content": format_tool_call("calculator", {"expression": expression})},
            {"role": "tool", "content": format_value(evaluate(expression))},
            {"role": "assistant", "content": problem.solution})


def plausible_wrong(answer: str, rng: random.Random) -> str:
    """A wrong answer a weak solver might give: off by one or ten, one digit changed, two digits swapped,
    a digit dropped or repeated.

    >>> rng = random.Random(0)
    >>> all(plausible_wrong(a, rng) != a for a in ["0", "7", "17", "100", "4321"] * 20)
    True
    """
    value = int(answer)
    while True:
        digits = list(answer)
        i = rng.randrange(len(digits))
        kind = rng.choice(["one", "ten", "digit", "swap", "drop", "repeat"])
        if kind in ("one", "ten"):
            candidate = str(value + rng.choice([-1, 1]) * (1 if kind == "one" else 10))
        elif kind == "digit":
            digits[i] = rng.choice([d for d in "0123456789" if d != digits[i]])
            candidate = "".join(digits)
        elif kind == "swap" and len(digits) > 1:
            j = i + 1 if i + 1 < len(digits) else i - 1
            digits[i], digits[j] = digits[j], digits[i]
            candidate = "".join(digits)
        elif kind == "drop" and len(digits) > 1:
            candidate = "".join(digits[:i] + digits[i + 1 :])
        else:  # repeat (and swap or drop of a single digit)
            candidate = "".join(digits[: i + 1] + digits[i:])
        candidate = str(int(candidate)) if candidate.lstrip("-").isdigit() else candidate  # "07" -> "7"
        if candidate != answer and not candidate.startswith("-"):
            return candidate


def verification_problems(problems: list[Problem], wrong_rate: float, seed: int) -> list[Problem]:
    """Judge-training examples: each problem with a candidate answer (its own, or a plausible wrong one with
    probability `wrong_rate`) in the judge's default prompt; the target is the judge's tag, the gold its label.

    >>> [v] = verification_problems([Problem("2+2=", "4", "4", "add")], 0.0, seed=0)
    >>> v.prompt, v.answer, v.solution, v.task
    ('Problem: 2+2=\\nAnswer: 4\\nReference: 4\\nCorrect? ', '1', '<score>1</score>', 'verify_add')
    """
    rng, out = random.Random(seed), []
    for p in problems:
        correct = rng.random() >= wrong_rate
        candidate = p.answer if correct else plausible_wrong(p.answer, rng)
        out.append(Problem(prompt=judge_prompt(DEFAULT_TEMPLATE, p.prompt, candidate, p.answer),
                           answer=str(int(correct)), solution=score_tag(correct), task=f"verify_{p.task}"))
    return out


class BatchSampler:
    """Endless shuffled batches over a list, reproducible from (seed, position) for resume."""

    def __init__(self, items: list, batch_size: int, seed: int):
        if not items:
            raise RecipeError("data: the training split is empty")
        self.items, self.batch_size, self.seed = items, batch_size, seed
        self.position = 0  # batches drawn so far

    def reset(self, items: list) -> None:
        """Start over on new items (a new round of online pairs)."""
        if not items:
            raise RecipeError("data: the training split is empty")
        self.items, self.position, self._cached_epoch = items, 0, None

    def next(self) -> list:
        n = len(self.items)
        start = self.position * self.batch_size
        out = []
        for i in range(start, start + self.batch_size):
            epoch, offset = divmod(i, n)
            order = self._order(epoch)
            out.append(self.items[order[offset]])
        self.position += 1
        return out

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_cached_epoch", None) != epoch:
            order = list(range(len(self.items)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached_epoch, self._cached_order = epoch, order
        return self._cached_order
