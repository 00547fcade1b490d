"""What every stage shares: its context, tokenization of prompts and responses, and timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rlkit.config import RecipeConfig, StageConfig
from rlkit.data import Problem
from rlkit.tracking import RunLogger
from rewards.base import Sample


@dataclass
class StageContext:
    """The live workers a stage drives. The trainer group starts from `model_path`; the pool follows it."""

    cfg: RecipeConfig
    stage: StageConfig
    index: int  # position of the stage in the recipe
    model_path: str  # the checkpoint this stage starts from (the previous stage's)
    tokenizer: Any
    train: list[Problem]
    trainer: Any  # rlkit.cluster.TrainerGroup
    pool: Any  # rlkit.cluster.RolloutPool
    scorer: Any  # rewards.Scorer, in this process or behind a Ray actor
    cluster: Any  # rlkit.cluster.Cluster, to make the stage's reference model
    logger: RunLogger
    held_out: list[Problem] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # {"value": best held-out metric so far}, shared across stages

    @property
    def lr(self) -> float:
        return self.cfg.stage_lr(self.index)

    @property
    def warmup_steps(self) -> int:
        return self.cfg.stage_warmup(self.index)

    @property
    def prefix(self) -> str:
        return self.stage.name or self.stage.kind

    def log_step(self, step: int, metrics: dict, extra: dict | None = None) -> bool:
        """Count a global step; log `metrics` under the stage's prefix every logging.log_every steps and at the
        stage's last step. Returns whether it logged."""
        self.logger.global_step += 1
        due = step % self.cfg.logging.log_every == 0 or step == self.stage.steps - 1
        if due:
            self.logger.log({f"{self.prefix}/{k}": v for k, v in metrics.items()} | (extra or {}))
        return due

    def maybe_evaluate(self, step: int) -> None:
        """Held-out evaluation every logging.eval_every steps inside the stage (its end is the runner's)."""
        every = self.cfg.logging.eval_every
        if not every or (step + 1) % every or step == self.stage.steps - 1:
            return
        from rlkit.evaluate import evaluate

        if self.stage.kind in ("sft", "dpo"):  # these stages do not sync every step
            self.pool.sync_weights(self.trainer.state_dict())
        metrics = evaluate(self.pool, self.tokenizer, self.scorer, self.held_out, self.cfg.logging.eval_temperature)
        self.logger.log({f"eval/{k}": v for k, v in metrics.items()})
        if self.is_best(metrics):
            self.trainer.save(str(self.logger.run_dir / "checkpoints" / "best"), self.model_path,
                              (self.logger.run_dir / "recipe.yaml").read_text(),
                              {"stage": self.index, "step": step, "metrics": metrics})

    def is_best(self, metrics: dict) -> bool:
        """Record `metrics` if its logging.best_metric beats every evaluation so far."""
        value = metrics.get(self.cfg.logging.best_metric)
        if value is None or value <= self.best.get("value", float("-inf")):
            return False
        self.best["value"] = value
        return True

    def seed(self) -> int:
        return self.cfg.trainer.seed * 1000 + self.index


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt token ids: BOS (when the tokenizer has one) + the text, no EOS."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encode_response(tokenizer, text: str) -> list[int]:
    """Response token ids ending in EOS, so the model learns to stop."""
    return tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]


def to_samples(problems: list[Problem], texts: list[str], repeat: int = 1) -> list[Sample]:
    """Pair each completion with its problem; completions come `repeat` per problem, in order."""
    return [
        Sample(prompt=p.prompt, completion=texts[i * repeat + j], gold=p.answer, task=p.task)
        for i, p in enumerate(problems)
        for j in range(repeat)
    ]


def generate_and_score(ctx: "StageContext", problems: list[Problem], n: int, temperature: float, seed: int,
                       timer: "Timer | None" = None):
    """n samples per prompt from the current policy (with the engine's log-probs), each scored by the rewards.

    Returns (prompt_ids, completions (B*n,) prompt-major, the scorer's ScoreOutput).
    """
    timer = timer or Timer()
    prompt_ids = [encode_prompt(ctx.tokenizer, p.prompt) for p in problems]
    with timer("generate"):
        groups = ctx.pool.generate(prompt_ids, n=n, temperature=temperature, seed=seed)
    completions = [c for g in groups for c in g]
    with timer("score"):
        scored = ctx.scorer.score(to_samples(problems, [c.text for c in completions], n))
    return prompt_ids, completions, scored


class Timer:
    """Wall-clock seconds per phase: `with timer("generate"): ...` then `timer.metrics(prefix)`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/time/{k}": v for k, v in self.seconds.items()}
