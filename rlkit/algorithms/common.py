"""What every stage shares: its context, tokenization of prompts and responses, and timing.

A stage's `train(ctx)` reads what it trains on from the context (cfg, stage, index, data) and works through three
parts that change for different reasons: `ctx.workers` (the live, typed workers: the policy's trainer group, the
engines, the scorer, the cluster that makes the stage's reference or critic, and the weight sync), `ctx.log` (the
stage's metrics, progress bar and completions tables) and `ctx.loop` (the step loop: resume, mid-stage
evaluations, snapshots and resume points).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Iterator

from rlkit.rewards.scorer import Scorer
from rlkit.runtime.cluster import Cluster, RolloutPool, TrainerGroup
from rlkit.runtime.checkpoint import Checkpointer, ResumePoint, RunState
from rlkit.recipe import LoggingConfig, RecipeConfig, StageConfig, TrainerConfig
from rlkit.data.tasks import BatchSampler, Problem
from rlkit.algorithms.episodes import episode_sampler
from rlkit.algorithms.evaluate import evaluate, log_evaluation
from rlkit.algorithms.gold import GoldMonitor
from rlkit.algorithms.experience import ExperienceMaker, ExperienceSource, completion_rows
from rlkit.training.lora import adapter_config
from rlkit.data.prepare import StageData
from rlkit.recipe.stage_kinds import STAGE_KINDS, checkpoint_name
from rlkit.runtime.tracking import RunLogger
from rlkit.rewards.base import Sample
from rlkit.rollout.generations import token_list
from rlkit.rollout.vllm_engine import SyncStats


@dataclass
class Workers:
    """The live workers a stage drives, in this process or behind Ray actors with the same interface
    (rlkit.runtime.cluster). The pool follows the trainer group through `sync_policy`."""

    trainer: "TrainerGroup | None"  # the policy's ranks (None: an average stage, which trains nothing)
    pool: "RolloutPool"
    scorer: "Scorer"  # or a ScorerGroup of Ray actors with the same score/close (rlkit.runtime.scoring)
    cluster: "Cluster"  # makes the stage's own workers (reference, critic) and releases them
    trainer_cfg: TrainerConfig
    # held while the engines sample, take weights or evaluate: an asynchronous sampler thread never overlaps them
    engine_lock: threading.Lock = field(default_factory=threading.Lock)
    _base_synced: bool = False  # trainer.lora_sync=adapter: the engines hold this stage's frozen base

    def sync_policy(self) -> SyncStats:
        """The engines take the policy's current weights: all of them (LoRA merged), or under
        trainer.lora_sync=adapter the adapter alone, after the stage's frozen base once. Returns the time and
        size of what was sent."""
        direct = self.pool.transport != "file"  # rollout.weight_transfer: from trainer rank 0 to the engines
        if self.trainer_cfg.lora_sync != "adapter":
            if direct:  # streamed, one gathered parameter at a time: nothing is gathered ahead of the lock
                with self.engine_lock:
                    return self.pool.pull_weights(self.trainer, "merged")
            state = self.trainer.state_dict()  # gathered before the lock: sampling goes on meanwhile
            with self.engine_lock:
                return self.pool.sync_weights(state)
        base = SyncStats(0.0, 0.0)
        if not self._base_synced:  # the engines may hold another stage's weights or an adapter over them
            if direct:
                with self.engine_lock:
                    base = self.pool.pull_weights(self.trainer, "base")
            else:
                state = self.trainer.base_state_dict()
                with self.engine_lock:
                    base = self.pool.sync_weights(state)
            self._base_synced = True
        # the adapter (a few MB) goes through files, whatever the transport: vLLM serves it as a LoRA request
        tensors = self.trainer.adapter_state_dict()
        with self.engine_lock:
            adapter = self.pool.sync_adapter(tensors, adapter_config(self.trainer_cfg))
        return SyncStats(base.seconds + adapter.seconds, base.megabytes + adapter.megabytes)

    @contextmanager
    def releasing(self, *workers) -> Iterator[None]:
        """The stage's own workers (reference, critic) are stopped when it ends, by an error too."""
        try:
            yield
        finally:
            self.cluster.release(*workers)


class StageLog:
    """One stage's logging: metrics under its prefix every logging.log_every steps (and at its last step), the
    progress bar with the latest values beside it, and the completions table logged with the next step."""

    def __init__(self, logger: RunLogger, cfg: LoggingConfig, prefix: str, steps: int):
        self.logger, self.cfg, self.prefix, self.steps = logger, cfg, prefix, steps
        self._bar: Any = None
        self._table: list = []  # completions waiting for `step`

    def progress(self, label: str, start: int) -> None:
        self._bar = self.logger.progress(self.steps, label, initial=start)

    def advance(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def show(self, **values: str) -> None:
        """Latest values beside the progress bar."""
        self._bar.set_postfix(**values)

    def step(self, step: int, metrics: dict, extra: dict | None = None) -> bool:
        """Count a global step; log `metrics` under the stage's prefix every logging.log_every steps and at the
        stage's last step. Returns whether it logged."""
        self.logger.global_step += 1
        if self._table:
            self.logger.table(f"{self.prefix}/completions", self._table)
            self._table = []
        due = step % self.cfg.log_every == 0 or step == self.steps - 1
        if due:
            self.logger.log({f"{self.prefix}/{k}": v for k, v in metrics.items()} | (extra or {}))
        return due

    def completions(self, step: int, samples: list[Sample], scored) -> None:
        """Every logging.completions_every steps, the first logging.table_rows samples as `<stage>/completions`."""
        every, rows = self.cfg.completions_every, self.cfg.table_rows
        if every and rows and step % every == 0:  # logged with the step's metrics, by `step`
            self._table = completion_rows(samples[:rows], scored)


class StepLoop:
    """The stage's step loop. Continues after a resume point inside the stage; after each step it evaluates
    (logging.eval_every, keeping the best checkpoint), snapshots (stage.save_every) and writes resume points
    (checkpoint.every)."""

    def __init__(self, ctx: "StageContext", state: RunState, checkpointer: Checkpointer | None,
                 resume: ResumePoint | None):
        self.ctx = ctx
        self.state = state  # the run's controller state, shared across stages
        self.checkpointer = checkpointer  # writes resume points (None: never)
        self.resume = resume  # a resume point inside this stage to continue from
        self.stopped_at: int | None = None  # the step after which reward.stop_on_gold_drop ended the stage

    def restored(self, key: str) -> Any:
        """The stage's own extra state saved with the resume point it continues from (None on a fresh start)."""
        return self.resume.extra().get(key) if self.resume is not None else None

    def steps(self, sampler: BatchSampler | None = None, groups: dict | None = None, extra: dict | None = None,
              position: Callable[[], int] | None = None,
              evaluate: Callable[[int], None] | None = None) -> Iterator[int]:
        """Yields the stage's step indices, from the resume point's on.

        `groups` are trainer groups besides the policy whose state a resume point keeps (PPO's critic; a
        reward_model stage's, which has no policy group); `extra` is stage state that is not derived from the
        recipe (DPO's pairs), read back with `restored`. `position()` is the sampler position a resume point keeps
        when batches are drawn ahead of the loop (ExperienceSource.position: that after the last batch trained on);
        by default the sampler's own. `evaluate(step)` replaces the policy's mid-stage evaluation (`maybe_evaluate`).
        """
        ctx = self.ctx
        policy = {} if ctx.workers.trainer is None else {"policy": ctx.workers.trainer}
        groups = policy | (groups or {})
        start = 0
        if self.resume is not None:
            start = self.resume.state.step
            for name, group in groups.items():
                group.load_state(str(self.resume.path / name))
            if sampler is not None:
                sampler.position = self.resume.extra()["sampler_position"]
            self.resume.restore_rng()
            if policy:
                ctx.workers.sync_policy()  # the engines restarted from the stage's start
        ctx.log.progress(f"{ctx.index}:{ctx.prefix}", start)
        every, total = ctx.cfg.checkpoint.every, ctx.stage.steps
        for step in range(start, total):
            yield step
            (evaluate or self.maybe_evaluate)(step)
            if self.stopped_at is not None:  # the stage ends here; the runner saves its checkpoint as at its end
                break
            self.maybe_snapshot(step)
            if self.checkpointer is not None and every and (step + 1) % every == 0 and step + 1 < total:
                self.state.step, self.state.global_step = step + 1, ctx.logger.global_step
                drawn = sampler.position if position is None else position()
                kept = {"sampler_position": drawn} if sampler is not None else {}
                self.checkpointer.save(self.state, groups, (extra or {}) | kept)
            ctx.log.advance()
        ctx.log.close()

    def maybe_snapshot(self, step: int) -> None:
        """Every stage.save_every steps, a checkpoint in `<name>.snapshots/step_<N>` (the stage's last step is
        its checkpoint proper)."""
        ctx, every = self.ctx, self.ctx.stage.save_every
        if every and (step + 1) % every == 0 and step + 1 < ctx.stage.steps:
            folder = ctx.run_dir / "checkpoints" / f"{ctx.checkpoint_name}.snapshots" / f"step_{step + 1:06d}"
            ctx.workers.trainer.save(str(folder), ctx.model_path, (ctx.run_dir / "recipe.yaml").read_text(),
                                     {"stage": ctx.index, "step": step + 1})

    def maybe_evaluate(self, step: int) -> None:
        """Held-out evaluation every logging.eval_every steps inside the stage (its end is the runner's)."""
        ctx, every = self.ctx, self.ctx.cfg.logging.eval_every
        if not every or (step + 1) % every or step == ctx.stage.steps - 1:
            return
        if not ctx.syncs_every_step:
            ctx.workers.sync_policy()
        metrics = ctx.evaluate()
        if self.is_best(metrics):
            ctx.workers.trainer.save(str(ctx.run_dir / "checkpoints" / "best"), ctx.model_path,
                                     (ctx.run_dir / "recipe.yaml").read_text(),
                                     {"stage": ctx.index, "step": step, "metrics": metrics})
        if ctx.gold.observe(metrics):  # reward.stop_on_gold_drop: the proxy is being over-optimised
            self.stopped_at = step
            n = ctx.cfg.reward.stop_on_gold_drop
            print(f"stage {ctx.index} ({ctx.stage.kind}): stopped after step {step + 1} of {ctx.stage.steps}: the "
                  f"held-out gold reward fell at {n} evaluations in a row while the proxy rose (gold "
                  f"{ctx.gold.gold[-n - 1]:.3f} -> {ctx.gold.gold[-1]:.3f}, proxy {ctx.gold.proxy[-n - 1]:.3f} -> "
                  f"{ctx.gold.proxy[-1]:.3f}; reward.stop_on_gold_drop={n})", flush=True)

    def is_best(self, metrics: dict) -> bool:
        """Record `metrics` if its logging.best_metric beats every evaluation so far."""
        value, best = metrics.get(self.ctx.cfg.logging.best_metric), self.state.best
        if value is None or value <= best.get("value", float("-inf")):
            return False
        best["value"] = value
        return True


@dataclass
class StageContext:
    """One stage of the recipe as its `train(ctx)` sees it. The trainer group starts from `model_path`."""

    cfg: RecipeConfig
    stage: StageConfig
    index: int  # position of the stage in the recipe
    model_path: str  # the checkpoint this stage starts from (the previous stage's)
    data: StageData | None  # what the stage trains on, rendered (None: an average stage)
    workers: Workers
    logger: RunLogger  # the run's
    held_out: list[Problem] = field(default_factory=list)  # rendered with the recipe's data section
    episodes: Any = None  # rlkit.algorithms.episodes.EpisodeSampler over the held-out set's renderer (None: single-turn)
    state: InitVar[RunState | None] = None  # the run's controller state (StepLoop)
    checkpointer: InitVar[Checkpointer | None] = None
    resume: InitVar[ResumePoint | None] = None
    log: StageLog = field(init=False)
    loop: StepLoop = field(init=False)
    gold: GoldMonitor = field(init=False)  # proxy against reward.gold: step metrics and the early stop

    def __post_init__(self, state, checkpointer, resume) -> None:
        self.log = StageLog(self.logger, self.cfg.logging, self.prefix, self.stage.steps)
        self.loop = StepLoop(self, state or RunState(), checkpointer, resume)
        # the early stop watches only a stage that climbs the rewards (GRPO, PPO); any stage's evaluations log gold
        stop = self.cfg.reward.stop_on_gold_drop if STAGE_KINDS[self.stage.kind].optimises_reward else 0
        self.gold = GoldMonitor(self.cfg.reward.gold_window, stop, self.loop.state.before)

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

    @property
    def run_dir(self):
        return self.logger.run_dir

    @property
    def syncs_every_step(self) -> bool:
        """The engines follow the trainer after every step (rlkit.recipe.stage_kinds), else once at the stage's end."""
        return STAGE_KINDS[self.stage.kind].syncs_every_step

    def seed(self) -> int:
        return self.cfg.trainer.seed * 1000 + self.index

    def experience_maker(self, pool=None) -> ExperienceMaker:
        """Samples from the run's engines (or `pool`, distillation's teacher) scored by the recipe's rewards; with the
        recipe's `env`, whole multi-turn episodes."""
        pool = pool or self.workers.pool
        return ExperienceMaker(pool, self.workers.scorer, self.cfg.reward.max_error_rate,
                               f"stage {self.index} ({self.stage.kind})", self.workers.engine_lock,
                               episode_sampler(self.cfg, pool, self.data.renderer))

    def experience_source(self, produce, sampler: BatchSampler) -> ExperienceSource:
        """The stage's batches, on-policy or up to rollout.max_staleness policy versions ahead of the trainer."""
        return ExperienceSource(produce, self.stage.steps, self.cfg.rollout.max_staleness)

    def evaluate(self, log: bool = True) -> dict[str, float]:
        """Held-out metrics of the engines' current weights, logged as eval/* with the completions table unless
        `log` is False."""
        with self.workers.engine_lock:
            evaluation = evaluate(self.workers.pool, self.workers.scorer, self.held_out, self.cfg.logging,
                                  self.cfg.reward.max_error_rate, episodes=self.episodes)
        return log_evaluation(self.logger, evaluation, self.cfg.logging.table_rows) if log else evaluation.metrics


def sampled_reply(completion, eos_id: int) -> list[int]:
    """A sampled completion's ids as an SFT or DPO reply: exactly what the engine sampled, with EOS appended when
    it was cut at max_new_tokens (so a kept answer teaches the model to stop)."""
    ids = token_list(completion.token_ids)
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
