"""What every stage shares: its context, tokenization of prompts and responses, and timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from rlkit.checkpoint import Checkpointer, ResumePoint, RunState
from rlkit.config import RecipeConfig, StageConfig
from rlkit.data import BatchSampler, Problem
from rlkit.lora import adapter_config
from rlkit.prepare import StageData
from rlkit.tracking import RunLogger
from rewards.base import Sample
from rollout.vllm_engine import SyncStats


SYNCS_EVERY_STEP = ("grpo", "ppo")  # stages whose engines follow the trainer after every step


def checkpoint_name(stage: StageConfig, index: int) -> str:
    return stage.name or f"{index + 1:02d}_{stage.kind}"


@dataclass
class StageContext:
    """The live workers a stage drives. The trainer group starts from `model_path`; the pool follows it."""

    cfg: RecipeConfig
    stage: StageConfig
    index: int  # position of the stage in the recipe
    model_path: str  # the checkpoint this stage starts from (the previous stage's)
    data: StageData | None  # what the stage trains on, rendered (None: an average stage)
    trainer: Any  # rlkit.cluster.TrainerGroup
    pool: Any  # rlkit.cluster.RolloutPool
    scorer: Any  # rewards.Scorer, in this process or behind a Ray actor
    cluster: Any  # rlkit.cluster.Cluster, to make the stage's reference model
    logger: RunLogger
    held_out: list[Problem] = field(default_factory=list)  # rendered with the recipe's data section
    state: RunState = field(default_factory=RunState)  # the run's controller state, shared across stages
    checkpointer: Checkpointer | None = None  # writes resume points (None: never)
    resume: ResumePoint | None = None  # a resume point inside this stage to continue from
    _bar: Any = None
    _table: list = field(default_factory=list)  # completions waiting for log_step
    _base_synced: bool = False  # trainer.lora_sync=adapter: the engines hold this stage's frozen base

    @property
    def lr(self) -> float:
        return self.cfg.stage_lr(self.index)

    @property
    def warmup_steps(self) -> int:
        return self.cfg.stage_warmup(self.index)

    @property
    def prefix(self) -> str:
        return self.stage.name or self.stage.kind

    @property
    def checkpoint_name(self) -> str:
        """The stage's checkpoint folder under RUN_DIR/checkpoints (snapshots go in `<name>.snapshots/`)."""
        return checkpoint_name(self.stage, self.index)

    def sync_policy(self) -> SyncStats:
        """The engines take the policy's current weights: all of them (LoRA merged), or under
        trainer.lora_sync=adapter the adapter alone, after the stage's frozen base once. Returns the time and
        size of what was sent."""
        if self.cfg.trainer.lora_sync != "adapter":
            return self.pool.sync_weights(self.trainer.state_dict())
        base = SyncStats(0.0, 0.0)
        if not self._base_synced:  # the engines may hold another stage's weights or an adapter over them
            base = self.pool.sync_weights(self.trainer.base_state_dict())
            self._base_synced = True
        adapter = self.pool.sync_adapter(self.trainer.adapter_state_dict(), adapter_config(self.cfg.trainer))
        return SyncStats(base.seconds + adapter.seconds, base.megabytes + adapter.megabytes)

    def restored(self, key: str) -> Any:
        """The stage's own extra state saved with the resume point it continues from (None on a fresh start)."""
        return self.resume.extra().get(key) if self.resume is not None else None

    def steps(self, sampler: BatchSampler | None = None, groups: dict | None = None,
              extra: dict | None = None) -> Iterator[int]:
        """The stage's step loop. Continues after the resume point when there is one; after each step it
        evaluates (logging.eval_every), writes a resume point (checkpoint.every) and advances the progress bar.

        `groups` are trainer groups besides the policy whose state a resume point keeps (PPO's critic);
        `extra` is stage state that is not derived from the recipe (DPO's pairs), read back with `restored`.
        """
        groups = {"policy": self.trainer} | (groups or {})
        start = 0
        if self.resume is not None:
            start = self.resume.state.step
            for name, group in groups.items():
                group.load_state(str(self.resume.path / name))
            if sampler is not None:
                sampler.position = self.resume.extra()["sampler_position"]
            self.resume.restore_rng()
            self.sync_policy()  # the engines restarted from the stage's start
        self._bar = self.logger.progress(self.stage.steps, f"{self.index}:{self.prefix}", initial=start)
        every = self.cfg.checkpoint.every
        for step in range(start, self.stage.steps):
            yield step
            self.maybe_evaluate(step)
            self.maybe_snapshot(step)
            if self.checkpointer is not None and every and (step + 1) % every == 0 and step + 1 < self.stage.steps:
                self.state.step, self.state.global_step = step + 1, self.logger.global_step
                position = {"sampler_position": sampler.position} if sampler is not None else {}
                self.checkpointer.save(self.state, groups, (extra or {}) | position)
            self._bar.update(1)
        self._bar.close()

    def show(self, **values: str) -> None:
        """Latest values beside the progress bar."""
        self._bar.set_postfix(**values)

    def log_step(self, step: int, metrics: dict, extra: dict | None = None) -> bool:
        """Count a global step; log `metrics` under the stage's prefix every logging.log_every steps and at the
        stage's last step. Returns whether it logged."""
        self.logger.global_step += 1
        if self._table:
            self.logger.table(f"{self.prefix}/completions", self._table)
            self._table = []
        due = step % self.cfg.logging.log_every == 0 or step == self.stage.steps - 1
        if due:
            self.logger.log({f"{self.prefix}/{k}": v for k, v in metrics.items()} | (extra or {}))
        return due

    def maybe_snapshot(self, step: int) -> None:
        """Every stage.save_every steps, a checkpoint in `<name>.snapshots/step_<N>` (the stage's last step is
        its checkpoint proper)."""
        every = self.stage.save_every
        if every and (step + 1) % every == 0 and step + 1 < self.stage.steps:
            folder = self.logger.run_dir / "checkpoints" / f"{self.checkpoint_name}.snapshots" / f"step_{step + 1:06d}"
            self.trainer.save(str(folder), self.model_path, (self.logger.run_dir / "recipe.yaml").read_text(),
                              {"stage": self.index, "step": step + 1})

    def evaluate(self, log: bool = True) -> dict[str, float]:
        """Held-out metrics of the engines' current weights, logged as eval/* with the completions table unless
        `log` is False."""
        from rlkit.evaluate import evaluate, log_evaluation  # rlkit.evaluate imports this module

        evaluation = evaluate(self.pool, self.scorer, self.held_out, self.cfg.logging,
                              self.cfg.reward.max_error_rate)
        return log_evaluation(self.logger, evaluation, self.cfg.logging.table_rows) if log else evaluation.metrics

    def maybe_evaluate(self, step: int) -> None:
        """Held-out evaluation every logging.eval_every steps inside the stage (its end is the runner's)."""
        every = self.cfg.logging.eval_every
        if not every or (step + 1) % every or step == self.stage.steps - 1:
            return
        if self.stage.kind not in SYNCS_EVERY_STEP:
            self.sync_policy()
        metrics = self.evaluate()
        if self.is_best(metrics):
            self.trainer.save(str(self.logger.run_dir / "checkpoints" / "best"), self.model_path,
                              (self.logger.run_dir / "recipe.yaml").read_text(),
                              {"stage": self.index, "step": step, "metrics": metrics})

    def log_completions(self, step: int, samples: list[Sample], scored) -> None:
        """Every logging.completions_every steps, the first logging.table_rows samples as `<stage>/completions`."""
        every, rows = self.cfg.logging.completions_every, self.cfg.logging.table_rows
        if every and rows and step % every == 0:  # logged with the step's metrics, by log_step
            self._table = completion_rows(samples[:rows], scored)

    def is_best(self, metrics: dict) -> bool:
        """Record `metrics` if its logging.best_metric beats every evaluation so far."""
        value, best = metrics.get(self.cfg.logging.best_metric), self.state.best
        if value is None or value <= best.get("value", float("-inf")):
            return False
        best["value"] = value
        return True

    def seed(self) -> int:
        return self.cfg.trainer.seed * 1000 + self.index


def sampled_reply(completion, eos_id: int) -> list[int]:
    """A sampled completion's ids as an SFT or DPO reply: exactly what the engine sampled, with EOS appended when
    it was cut at max_new_tokens (so a kept answer teaches the model to stop)."""
    ids = list(completion.token_ids)
    return ids if completion.finished else ids + [eos_id]


def to_samples(problems: list[Problem], texts: list[str], repeat: int = 1) -> list[Sample]:
    """Pair each completion with its problem; completions come `repeat` per problem, in order."""
    return [
        Sample(prompt=p.prompt, completion=texts[i * repeat + j], gold=p.answer, task=p.task)
        for i, p in enumerate(problems)
        for j in range(repeat)
    ]


def completion_rows(samples: list[Sample], scored) -> list[dict]:
    """Table rows for samples and their ScoreOutput (matched by position; `samples` may be a prefix)."""
    return [
        {"prompt": s.prompt, "gold": s.gold, "completion": s.completion, "reward": score,
         "verdict": result.verdict.value}
        for s, score, result in zip(samples, scored.scores, scored.results)
    ]


def generate_and_score(ctx: "StageContext", problems: list[Problem], n: int, temperature: float, seed: int,
                       timer: "Timer | None" = None, step: int | None = None, pool=None):
    """n samples per prompt from the current policy (with the engine's log-probs), each scored by the rewards.
    With `step`, a training step, they may also be logged as a completions table (StageContext.log_completions).
    `pool` samples from another model's engines instead (distillation's teacher).

    Returns (prompt_ids, completions (B*n,) prompt-major, the scorer's ScoreOutput).
    """
    timer = timer or Timer()
    prompt_ids = [list(p.prompt_ids) for p in problems]  # rendered once, when the data was prepared
    with timer("generate"):
        groups = (pool or ctx.pool).generate(prompt_ids, n=n, temperature=temperature, seed=seed)
    completions = [c for g in groups for c in g]
    samples = to_samples(problems, [c.text for c in completions], n)
    with timer("score"):
        scored = ctx.scorer.score(samples)
    check_error_rate(scored, ctx.cfg.reward.max_error_rate, f"stage {ctx.index} ({ctx.stage.kind})")
    if step is not None:
        ctx.log_completions(step, samples, scored)
    return prompt_ids, completions, scored


class RewardFailure(RuntimeError):
    """The rewards failed on too many samples of a batch (reward.max_error_rate): the reward is broken."""


def check_error_rate(scored, max_rate: float, where: str) -> None:
    """Stop when the share of samples the rewards failed on (verifier errors, not wrong answers or a model's
    timeouts) passes `max_rate`, whatever reward.on_error does with each of them."""
    errors, n = scored.stats.get("errors", 0.0), len(scored.scores)
    if n and errors / n > max_rate:
        raise RewardFailure(
            f"{where}: the rewards failed on {int(errors)} of {n} samples, above reward.max_error_rate={max_rate}; "
            "check the reward on a file of samples with python -m rlkit.score (its --output shows each error)")


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
