"""What every stage shares: its context, tokenization of prompts and responses, and timing."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rlkit.checkpoint import Checkpointer, ResumePoint, RunState
from rlkit.config import RecipeConfig, StageConfig, checkpoint_name
from rlkit.data import BatchSampler, Problem
from rlkit.episodes import episode_sampler
from rlkit.evaluate import evaluate, log_evaluation
from rlkit.experience import ExperienceMaker, ExperienceSource, completion_rows
from rlkit.lora import adapter_config
from rlkit.prepare import StageData
from rlkit.tracking import RunLogger
from rewards.base import Sample
from rollout.vllm_engine import SyncStats


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
    syncs_every_step: bool = False  # the engines follow the trainer after every step (rlkit.algorithms.STAGES)
    episodes: Any = None  # rlkit.episodes.EpisodeSampler over the held-out set's renderer (None: single-turn)
    _bar: Any = None
    _table: list = field(default_factory=list)  # completions waiting for log_step
    _base_synced: bool = False  # trainer.lora_sync=adapter: the engines hold this stage's frozen base
    # held while the engines sample, take weights or evaluate: an asynchronous sampler thread never overlaps them
    engine_lock: threading.Lock = field(default_factory=threading.Lock)

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
            state = self.trainer.state_dict()  # gathered before the lock: sampling goes on meanwhile
            with self.engine_lock:
                return self.pool.sync_weights(state)
        base = SyncStats(0.0, 0.0)
        if not self._base_synced:  # the engines may hold another stage's weights or an adapter over them
            state = self.trainer.base_state_dict()
            with self.engine_lock:
                base = self.pool.sync_weights(state)
            self._base_synced = True
        tensors = self.trainer.adapter_state_dict()
        with self.engine_lock:
            adapter = self.pool.sync_adapter(tensors, adapter_config(self.cfg.trainer))
        return SyncStats(base.seconds + adapter.seconds, base.megabytes + adapter.megabytes)

    def experience_maker(self, pool=None) -> ExperienceMaker:
        """Samples from the run's engines (or `pool`, distillation's teacher) scored by the recipe's rewards; with the
        recipe's `env`, whole multi-turn episodes."""
        pool = pool or self.pool
        return ExperienceMaker(pool, self.scorer, self.cfg.reward.max_error_rate,
                               f"stage {self.index} ({self.stage.kind})", self.engine_lock,
                               episode_sampler(self.cfg, pool, self.data.renderer))

    def experience_source(self, produce, sampler: BatchSampler) -> ExperienceSource:
        """The stage's batches, on-policy or up to rollout.max_staleness policy versions ahead of the trainer."""
        return ExperienceSource(produce, self.stage.steps, self.cfg.rollout.max_staleness)

    @contextmanager
    def releasing(self, *workers) -> Iterator[None]:
        """The stage's own workers (reference, critic) are stopped when it ends, by an error too."""
        try:
            yield
        finally:
            self.cluster.release(*workers)

    def restored(self, key: str) -> Any:
        """The stage's own extra state saved with the resume point it continues from (None on a fresh start)."""
        return self.resume.extra().get(key) if self.resume is not None else None

    def steps(self, sampler: BatchSampler | None = None, groups: dict | None = None,
              extra: dict | None = None,
              position: Callable[[], int] | None = None) -> Iterator[int]:
        """The stage's step loop. Continues after the resume point when there is one; after each step it
        evaluates (logging.eval_every), writes a resume point (checkpoint.every) and advances the progress bar.

        `groups` are trainer groups besides the policy whose state a resume point keeps (PPO's critic);
        `extra` is stage state that is not derived from the recipe (DPO's pairs), read back with `restored`.
        `position()` is the sampler position a resume point keeps when batches are drawn ahead of the loop
        (ExperienceSource.position: that after the last batch trained on); by default the sampler's own.
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
                drawn = sampler.position if position is None else position()
                kept = {"sampler_position": drawn} if sampler is not None else {}
                self.checkpointer.save(self.state, groups, (extra or {}) | kept)
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
        with self.engine_lock:
            evaluation = evaluate(self.pool, self.scorer, self.held_out, self.cfg.logging,
                                  self.cfg.reward.max_error_rate, episodes=self.episodes)
        return log_evaluation(self.logger, evaluation, self.cfg.logging.table_rows) if log else evaluation.metrics

    def maybe_evaluate(self, step: int) -> None:
        """Held-out evaluation every logging.eval_every steps inside the stage (its end is the runner's)."""
        every = self.cfg.logging.eval_every
        if not every or (step + 1) % every or step == self.stage.steps - 1:
            return
        if not self.syncs_every_step:
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
