"""Multi-turn episodes over the rollout engines: the policy answers, the environment replies (envs/), repeat.

Token-in/token-out: an episode's ids are the prompt, then each turn's sampled ids exactly as the engine returned
them, then the environment's turns rendered on their own (rlkit.data.chat.Renderer.env_ids) and appended; nothing before
is ever re-tokenized, so the ids a trainer sees are the ids sampled. Environment ids get log-prob 0.0 and loss mask
0, sampled ids mask 1. An episode ends when the environment says so (`finished`), or unfinished when a turn is cut
at max_new_tokens, max_turns run out, or the next turn would not fit `max_episode_tokens` (sampled and environment
tokens together).

Many episodes are in flight at once: each turn samples every active episode in one engine call (one per distinct
count of identical contexts: identical contexts share one prompt with n samples, prefilled once), and the
environments step in a thread pool. The engines keep prefix caching on (vLLM's default for these models), so a
turn's prompt reuses the KV blocks of the turns before it.
"""

from __future__ import annotations

import concurrent.futures
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from rlkit.envs.base import Environment, Message, StepResult
from rlkit.envs.tools import ToolEnv, build_tools
from rlkit.rewards.registry import RewardConfigError, load_class
from rlkit.recipe import EnvConfig, RecipeError
from rlkit.recipe import names
from rlkit.recipe.names import Registry
from rlkit.rollout.generations import token_list

ENV_THREADS = 8  # environments stepping at once (a python tool call is a sandboxed process)


@dataclass(frozen=True)
class Episode:
    """One episode after its prompt; fields named as a single-turn Completion's, so stages read either."""

    token_ids: tuple[int, ...]  # (L,) sampled and environment tokens, in order, exactly the ids sampled
    logprobs: tuple[float, ...]  # (L,) the engine's log-prob of each sampled token, 0.0 for environment tokens
    loss_mask: tuple[int, ...]  # (L,) 1 for sampled tokens, 0 for environment tokens
    text: str  # the last assistant answer (what the recipe's rewards score)
    finished: bool  # the environment ended it (False: cut by max_new_tokens, max_turns or max_episode_tokens)
    reward_parts: Mapping[str, float]  # the environment's parts, summed over the episode
    turns: int  # assistant turns sampled
    tool_calls: int
    tool_errors: int
    tool_seconds: float
    prompt_ids: tuple[int, ...] = ()  # (P,) the prompt it started from (the environment may open its own)
    transcript: str = ""  # the whole episode after the prompt as text, special tokens kept (completion tables)


@dataclass
class _Live:
    """An episode in flight."""

    prompt_ids: list[int]
    history: list[Message]  # the conversation so far (chat templates render the environment's turns after it)
    env: Environment
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    text: str = ""
    parts: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    stats: list[float] = field(default_factory=lambda: [0, 0, 0.0])  # tool calls, tool errors, tool seconds
    active: bool = True
    finished: bool = False

    def context(self) -> tuple[int, ...]:
        return (*self.prompt_ids, *self.token_ids)

    def end(self, finished: bool) -> None:
        self.active, self.finished = False, finished


def run_episodes(pool, renderer, env_factory: Callable[[], Environment], problems: Sequence, n: int,
                 temperature: float, seed: int | None, max_turns: int, max_episode_tokens: int,
                 max_new_tokens: int | None = None) -> list[list[Episode]]:
    """n episodes per problem, [problem][sample] as pool.generate's completions. `max_new_tokens` caps each turn
    (None: only the episode's budget); `problems` carry their rendered `prompt_ids` (rlkit.data.prepare)."""
    groups = [[_start(renderer, env_factory(), p) for _ in range(n)] for p in problems]
    episodes = [e for group in groups for e in group]
    with concurrent.futures.ThreadPoolExecutor(ENV_THREADS, thread_name_prefix="env") as threads:
        for turn in range(max_turns):
            active = [e for e in episodes if e.active]
            if not active:
                break
            turn_seed = None if seed is None else seed + 1_000_003 * turn
            _sample_turn(pool, renderer, active, temperature, turn_seed, max_episode_tokens, max_new_tokens)
            answered = [e for e in active if e.active]  # ended at a stop token: the environment's turn
            results = list(threads.map(lambda e: e.env.step(e.text), answered))
            for e, result in zip(answered, results):
                _apply(renderer, e, result, last_turn=turn == max_turns - 1, budget=max_episode_tokens)
    return [[_freeze(renderer, e) for e in group] for group in groups]


def _start(renderer, env: Environment, problem) -> _Live:
    opening = env.reset(problem)
    prompt = renderer.opening_ids(opening) if opening else list(problem.prompt_ids)
    return _Live(prompt, renderer.history(problem, opening), env)


def _sample_turn(pool, renderer, active: list[_Live], temperature: float, seed: int | None, budget: int,
                 max_new_tokens: int | None) -> None:
    """One assistant turn for every active episode: one engine call per count of identical contexts."""
    same: dict[tuple[int, ...], list[_Live]] = defaultdict(list)
    for e in active:
        same[e.context()].append(e)
    by_count: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for context, members in same.items():
        by_count[len(members)].append(context)
    for count, contexts in by_count.items():
        rooms = [budget - len(same[c][0].token_ids) for c in contexts]
        cap = max(rooms) if max_new_tokens is None else min(max_new_tokens, max(rooms))
        outputs = pool.generate([list(c) for c in contexts], n=count, temperature=temperature,
                                max_new_tokens=cap, seed=seed)
        for context, room, completions in zip(contexts, rooms, outputs):
            for e, c in zip(same[context], completions):
                _append_turn(renderer, e, c, room)


def _append_turn(renderer, e: _Live, completion, room: int) -> None:
    """Append a sampled turn (cut to the episode's remaining `room`); a turn that did not end at a stop token
    ends the episode unfinished."""
    ids, cut = token_list(completion.token_ids[:room]), len(completion.token_ids) > room
    e.token_ids += ids
    e.logprobs += [float(x) for x in completion.logprobs[:room]]
    e.loss_mask += [1] * len(ids)
    e.turns += 1
    e.text = renderer.tokenizer.decode(ids, skip_special_tokens=True) if cut else completion.text
    if cut or not completion.finished:
        e.end(finished=False)
    else:
        e.history.append({"role": "assistant", "content": e.text})


def _apply(renderer, e: _Live, result: StepResult, last_turn: bool, budget: int) -> None:
    """The environment's reply: its reward parts and stats count; its turns are appended unless the episode
    ends here (done, out of turns, or no room left to answer them)."""
    for k, v in result.reward_parts.items():
        e.parts[k] = e.parts.get(k, 0.0) + float(v)
    e.stats = [e.stats[0] + result.tool_calls, e.stats[1] + result.tool_errors, e.stats[2] + result.tool_seconds]
    if result.done:
        return e.end(finished=True)
    env_ids = renderer.env_ids(e.history, result.messages) if not last_turn else []
    if last_turn or len(e.token_ids) + len(env_ids) >= budget:  # no room for even one answering token
        return e.end(finished=False)
    e.token_ids += env_ids
    e.logprobs += [0.0] * len(env_ids)
    e.loss_mask += [0] * len(env_ids)
    e.history += list(result.messages)


def _freeze(renderer, e: _Live) -> Episode:
    calls, errors, seconds = e.stats
    return Episode(tuple(e.token_ids), tuple(e.logprobs), tuple(e.loss_mask), e.text, e.finished, dict(e.parts),
                   e.turns, int(calls), int(errors), float(seconds), tuple(e.prompt_ids), renderer.text(e.token_ids))


def episode_metrics(episodes: Sequence[Episode] | Sequence[Sequence[Episode]]) -> dict[str, float]:
    """Per-episode means (turns, tool calls, length, share of environment tokens), the tool error rate (failed
    calls / calls) and the time in tools; episodes flat or [prompt][sample].

    >>> e = Episode((1, 2, 3), (-0.1, 0.0, -0.2), (1, 0, 1), "3", True, {}, 2, 2, 1, 0.5)
    >>> episode_metrics([[e], [e]])["episode/tool_error_rate"], episode_metrics([e])["episode/env_token_share"]
    (0.5, 0.3333333333333333)
    """
    flat = [x for item in episodes for x in (item if isinstance(item, (list, tuple)) else [item])]
    count = max(len(flat), 1)
    calls, errors = sum(e.tool_calls for e in flat), sum(e.tool_errors for e in flat)
    tokens, env_tokens = sum(len(e.loss_mask) for e in flat), sum(len(e.loss_mask) - sum(e.loss_mask) for e in flat)
    seconds = sum(e.tool_seconds for e in flat)
    return {
        "episode/turns": sum(e.turns for e in flat) / count,
        "episode/tool_calls": calls / count,
        "episode/tool_error_rate": errors / calls if calls else 0.0,
        "episode/tool_seconds": seconds,
        "episode/tool_seconds_per_call": seconds / calls if calls else 0.0,
        "episode/length": tokens / count,
        "episode/env_token_share": env_tokens / tokens if tokens else 0.0,
        "episode/finished_rate": sum(e.finished for e in flat) / count,
    }


@dataclass(frozen=True)
class EpisodeSampler:
    """Multi-turn sampling in place of the engines' single-turn `generate`, for problems: what ExperienceMaker and
    held-out evaluation call when the recipe has an `env`."""

    pool: object  # rlkit.runtime.cluster.RolloutPool
    renderer: object  # rlkit.data.chat.Renderer of the data the problems were rendered with
    env_factory: Callable[[], Environment]
    max_turns: int
    episode_tokens: int  # rollout.episode_tokens
    max_new_tokens: int  # per turn

    def __call__(self, problems: Sequence, n: int, temperature: float, seed: int | None,
                 max_new_tokens: int | None = None) -> list[list[Episode]]:
        return run_episodes(self.pool, self.renderer, self.env_factory, problems, n, temperature, seed,
                            self.max_turns, self.episode_tokens, max_new_tokens or self.max_new_tokens)


def episode_sampler(cfg, pool, renderer) -> EpisodeSampler | None:
    """The recipe's multi-turn sampler over `pool` (None: the recipe has no env, sampling is single-turn)."""
    factory = make_env_factory(cfg.env)
    if factory is None:
        return None
    return EpisodeSampler(pool, renderer, factory, cfg.rollout.max_turns, cfg.rollout.episode_tokens,
                          cfg.rollout.max_new_tokens)


# env.name: name -> f(env section) -> a factory of a new environment per episode (env.import_path: a user's class)
ENVIRONMENTS: Registry[Callable[[EnvConfig], Callable[[], Environment]]] = Registry("env.name", names.ENVIRONMENTS)


@ENVIRONMENTS.register("tools")
def tool_env(cfg: EnvConfig) -> Callable[[], Environment]:
    """Built-in tools (rlkit.envs.tools), made once and shared: ToolEnv keeps no state between steps."""
    try:
        env = ToolEnv(build_tools(cfg.tools, cfg.tool_options), **cfg.kwargs)
    except TypeError as e:
        raise RecipeError(f"env.kwargs / env.tool_options: {e}") from e
    return lambda: env


def make_env_factory(cfg: EnvConfig) -> Callable[[], Environment] | None:
    """A new environment per episode from the recipe's `env` section (None without one): a built-in by name
    (ENVIRONMENTS), or the class at env.import_path."""
    if not cfg.enabled:
        return None
    if cfg.name:
        return ENVIRONMENTS.get(cfg.name)(cfg)
    try:
        cls = load_class(cfg.import_path, "env.import_path")  # the loader user rewards go through
    except RewardConfigError as e:
        raise RecipeError(str(e)) from e
    kwargs = dict(cfg.kwargs)
    return lambda: cls(**kwargs)
