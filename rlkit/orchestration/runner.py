"""Run a recipe: its stages in order, each continuing from the previous stage's weights.

Phases: check every input (the model path, every stage's data, rendered and length-checked) → load or build the
model → make the run folder → start the rollout engine → for each stage: evaluate, train, save a Hugging Face
checkpoint with the resolved recipe beside it, evaluate again. Resume points (rlkit.runtime.checkpoint) are written after
the first evaluation, between stages and every `checkpoint.every` steps; `resume: auto` continues from the latest
one. A run that fails before its first resume point removes the run folder it made.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from rlkit.algorithms.advantages import get_estimator
from rlkit.algorithms.common import StageContext, Workers
from rlkit.data.chat import stop_token_ids
from rlkit.runtime.checkpoint import Checkpointer, ResumePoint, RunState, split_metrics
from rlkit.runtime.cluster import Cluster
from rlkit.runtime.scoring import live_rewards, names_stage
from rlkit.algorithms.episodes import episode_sampler
from rlkit.recipe import RecipeConfig, RecipeError, stage_updates, to_yaml
from rlkit.recipe.stage_kinds import INIT, STAGE_KINDS, earlier_policy
from rlkit.algorithms.evaluate import evaluate, evaluate_sets, log_evaluation
from rlkit.training.losses import resolve_switches
from rlkit.training.modeling import build_char_tokenizer, check_context, init_model, load_tokenizer, quiet_checkpoint_bars, \
    resolve_model_path, save_checkpoint, checkpoint_state
from rlkit.data.prepare import EvalSet, RunData, describe, prepare_run_data
from rlkit.training.precision import resolve_recipe
from rlkit.runtime.tracking import RunLogger

log = logging.getLogger(__name__)


def check_run_dir(cfg: RecipeConfig) -> Path:
    """The run directory; refuse an existing, non-empty one unless `logging.overwrite`."""
    run_dir = Path(cfg.logging.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.logging.overwrite:
        raise RecipeError(
            f"logging.output_dir: '{run_dir}' already holds a run; choose another folder, set resume=auto to "
            "continue it, or set logging.overwrite=true"
        )
    existing = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"logging.output_dir: cannot create '{run_dir}' ('{existing}' is not a folder you can write "
                          "to); choose a writable folder")
    return run_dir


def remove_new_run_dir(run_dir: Path, existed: bool) -> None:
    """After a failed start: remove the run folder if this run made it (a folder the user had is kept)."""
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)


def find_resume_point(cfg: RecipeConfig, recipe_yaml: str) -> ResumePoint | None:
    """With `resume: auto`, the run directory's latest resume point, checked against this recipe."""
    run_dir = Path(cfg.logging.output_dir)
    if cfg.resume != "auto" or not run_dir.exists():
        return None
    point = Checkpointer(run_dir, cfg.checkpoint.keep).latest()
    if point is None:
        if any(run_dir.iterdir()) and not cfg.logging.overwrite:
            raise RecipeError(
                f"resume: '{run_dir}' has no resume point to continue from (checkpoints/resume/latest); choose "
                "another logging.output_dir, or set logging.overwrite=true to start over in it"
            )
        return None
    changed = recipe_changes((run_dir / "recipe.yaml").read_text(), recipe_yaml)
    if changed:
        raise RecipeError(
            f"resume: the recipe differs from the one '{run_dir}' was started with, at {', '.join(changed)}; "
            "resume with the same recipe, or start a new logging.output_dir"
        )
    return point


def recipe_changes(old_yaml: str, new_yaml: str) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, ignoring those a resume may change, keys the
    old recipe lacks (fields a newer rlkit added, at their defaults) and keys the new one lacks (fields a newer rlkit
    removed, such as algo.value_coef, which nothing read).

    >>> recipe_changes("{algo: {epsilon: 0.2, value_coef: 0.5}, resume: never}", "{algo: {epsilon: 0.3}, resume: auto}")
    ['algo.epsilon']
    """
    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    old, new = flat(yaml.safe_load(old_yaml)), flat(yaml.safe_load(new_yaml))
    free = {"resume", "logging.overwrite"}
    return sorted(k for k in old if k not in free and k in new and old[k] != new[k])


def run(cfg: RecipeConfig) -> dict:
    """Run every stage, or continue from a resume point (`resume: auto`); returns the summary (held-out
    metrics before and after each stage)."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    cfg = resolve_recipe(cfg)  # `auto` dtypes decided once, for the devices the workers use; logged with the reason
    recipe_yaml = to_yaml(cfg)
    if any(STAGE_KINDS[s.kind].uses_advantage_estimator for s in cfg.stages):
        get_estimator(cfg.algo.advantage_estimator)  # an unknown estimator or import path fails here too
    resolve_switches(cfg.algo, cfg.ref)  # and so does a loss switch's import path
    resume = find_resume_point(cfg, recipe_yaml)
    if resume is not None and resume.state.stage >= len(cfg.stages):
        return finished_summary(cfg, resume)
    live = start(cfg, recipe_yaml, resume)
    try:
        state = live.state
        print(f"held-out accuracy before stage {state.stage}: {accuracy_text(live.data.evals, state.before)}",
              flush=True)
        for index in range(state.stage, len(cfg.stages)):
            train_stage(live, index, resume if resume is not None and resume.state.step and index == state.stage
                        else None)
        summary = state.summary | {"seconds": time.perf_counter() - live.started}
        (live.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        live.logger.summary({f"final/{k}": v for k, v in state.before.items()})
    finally:
        live.close()
    return summary


def finished_summary(cfg: RecipeConfig, resume: ResumePoint) -> dict:
    """The summary of a run that has already finished (`resume: auto` on it), written again if it was lost."""
    print(f"{cfg.logging.output_dir}: the run has already finished; nothing to resume", flush=True)
    summary_file = Path(cfg.logging.output_dir) / "summary.json"
    if not summary_file.exists():  # killed between the last resume point and the summary
        summary_file.write_text(json.dumps(resume.state.summary | {"seconds": resume.state.seconds}, indent=2))
    return json.loads(summary_file.read_text())


@dataclass
class LiveRun:
    """A started run: its workers, logger, data and controller state, for the stages to train on."""

    cfg: RecipeConfig
    recipe_yaml: str
    run_dir: Path
    data: RunData
    cluster: Cluster
    scorer: Any
    pool: Any
    logger: RunLogger
    checkpointer: Checkpointer
    state: RunState
    episodes: Any  # the multi-turn sampler, or None
    started: float  # perf_counter at the (first) start, less the seconds a resumed run had run

    def close(self) -> None:
        _close(self.pool, self.scorer, self.logger, self.cluster)


def start(cfg: RecipeConfig, recipe_yaml: str, resume: ResumePoint | None) -> LiveRun:
    """Check the model and every stage's data before anything is written, then make the run folder, the workers
    and the logger, and evaluate the starting model (a fresh run). A failure before the first resume point closes
    what started and removes the run folder this run made."""
    run_dir = Path(cfg.logging.output_dir) if resume else check_run_dir(cfg)
    folder = resume.state.model_path if resume else ""
    if not resume and cfg.model.path:
        folder = str(resolve_model_path(cfg.model.path))  # a hub id is downloaded (or fails in one line) here
    check_context(cfg.model, folder)
    quiet_checkpoint_bars()
    tokenizer = load_tokenizer(folder) if folder else build_char_tokenizer()
    data = prepare_run_data(cfg, tokenizer, stop_token_ids(folder))
    existed = run_dir.exists()
    model = None if resume else init_model(cfg.model, folder, tokenizer)[0]
    cluster = Cluster(cfg)
    scorer = pool = logger = None
    started = time.perf_counter() - (resume.state.seconds if resume else 0.0)
    try:
        if resume is None:
            make_run_dir(run_dir)
        cluster.check_storage(run_dir)  # every node must see the run folder, before any worker starts
        # unknown rewards or import paths fail here, before anything is written; a reward model a stage trains
        # joins once that stage has run (live_rewards)
        scorer = cluster.scorer(live_rewards(cfg, run_dir, resume.state.stage if resume else 0))
        checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep)
        if resume is None:
            state = new_run_dir(run_dir, recipe_yaml, data, model, tokenizer)
            del model  # from here on the trainer group owns the weights
        else:
            state = resume.state
            moved = split_metrics(run_dir / "metrics.jsonl", state.global_step)
            print(f"resuming {run_dir} at stage {state.stage}, step {state.step} (global step {state.global_step}); "
                  f"{moved} metric records logged after that point moved to metrics.orphaned.jsonl", flush=True)
        logger = RunLogger(cfg.logging, run_dir, OmegaConf.to_container(OmegaConf.create(recipe_yaml)),
                           state.wandb_id)
        state.wandb_id, logger.global_step = logger.run_id, state.global_step
        pool = cluster.rollout_pool(state.model_path)
        episodes = episode_sampler(cfg, pool, data.renderer)  # None unless the recipe has an env (multi-turn)
        if resume is None:
            state.before = evaluate_policy(cfg, data, pool, scorer, logger, episodes)
            checkpointer.save(state)
    except BaseException:
        _close(pool, scorer, logger, cluster)
        if resume is None:
            remove_new_run_dir(run_dir, existed)
        raise
    return LiveRun(cfg, recipe_yaml, run_dir, data, cluster, scorer, pool, logger, checkpointer, state, episodes,
                   started)


def evaluate_policy(cfg: RecipeConfig, data: RunData, pool, scorer, logger: RunLogger, episodes) -> dict:
    """The engines' policy on the held-out set and every further set, logged; its metrics (a stage's `before`)."""
    evaluation = evaluate(pool, scorer, data.held_out, cfg.logging, cfg.reward.max_error_rate, episodes=episodes)
    metrics = log_evaluation(logger, evaluation, cfg.logging.table_rows)
    return metrics | evaluate_sets(pool, scorer, data.evals, logger, cfg.logging, cfg.reward.max_error_rate, episodes)


def make_run_dir(run_dir: Path) -> None:
    """The new run's folder, made before anything else so every node can be asked whether it sees it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"logging.output_dir: cannot create '{run_dir}' ({e.strerror}); choose a folder "
                          "you can write to") from e


def new_run_dir(run_dir: Path, recipe_yaml: str, data: RunData, model, tokenizer) -> RunState:
    """The made run folder with the resolved recipe, the data description and the starting checkpoint (00_init)."""
    (run_dir / "recipe.yaml").write_text(recipe_yaml)
    (run_dir / "data.json").write_text(json.dumps(describe(data), indent=2))
    return RunState(model_path=str(save_checkpoint(model, tokenizer, run_dir / "checkpoints" / INIT, recipe_yaml)))


def train_stage(live: LiveRun, index: int, resume: ResumePoint | None) -> None:
    """Stage `index`: train it from the current model, evaluate, keep the best checkpoint, log, and write the resume
    point the next stage starts from. `resume`: the point inside this stage to continue from."""
    cfg, state, data, logger = live.cfg, live.state, live.data, live.logger
    stage, t0 = cfg.stages[index], time.perf_counter()
    if stage.start and resume is None:  # resumed inside the stage: its resume point holds the switched policy
        start_from(live, earlier_policy(cfg.stages, index, stage.start))  # validated when the recipe loaded
    trainer = None if not STAGE_KINDS[stage.kind].trains_model else live.cluster.trainer_group(
        state.model_path, cfg.stage_lr(index), cfg.stage_warmup(index), stage_updates(cfg, index))
    stage_data = data.stages[index]
    ctx = StageContext(cfg, stage, index, state.model_path, stage_data,
                       Workers(trainer, live.pool, live.scorer, live.cluster, cfg.trainer), logger, data.held_out,
                       live.episodes, state, live.checkpointer, resume)
    if stage_data is not None and not ctx.loop.resume:
        logger.log({f"{ctx.prefix}/data/{k}": v for k, v in stage_data.stats.items()})
    model_path = run_stage(ctx, live.recipe_yaml)
    record: dict[str, Any] = {"name": Path(model_path).name, "kind": stage.kind}
    if STAGE_KINDS[stage.kind].yields_policy:
        after = ctx.evaluate()
        after |= evaluate_sets(live.pool, live.scorer, data.evals, logger, cfg.logging, cfg.reward.max_error_rate,
                               live.episodes)
        if ctx.loop.is_best(after):
            copy_checkpoint(Path(model_path), live.run_dir / "checkpoints" / "best")
    else:  # a reward model: the policy is the one this stage started from, evaluated already
        after = state.before
        record["held_out"] = json.loads((Path(model_path) / "rlkit_stage.json").read_text()).get("held_out", {})
        if names_stage(cfg, index):  # the rewards that score with it take it from the next stage on
            live.scorer.close()
            live.cluster.release(live.scorer)
            live.scorer = live.cluster.scorer(live_rewards(cfg, live.run_dir, index + 1))
    seconds = time.perf_counter() - t0
    change = accuracy_text(data.evals, state.before, after) if STAGE_KINDS[stage.kind].yields_policy else \
        f"{accuracy_text(data.evals, after)}, the policy unchanged"
    print(f"stage {index} ({stage.kind}): held-out accuracy {change} ({seconds:.0f}s)", flush=True)
    stopped = {} if ctx.loop.stopped_at is None else {"stopped_at_step": ctx.loop.stopped_at + 1}  # gold drop
    state.summary["stages"].append(record | {"before": state.before, "after": after, "seconds": seconds} | stopped)
    state.stage, state.step, state.before = index + 1, 0, after
    if STAGE_KINDS[stage.kind].yields_policy:
        state.model_path = model_path
    state.global_step, state.seconds = logger.global_step, time.perf_counter() - live.started
    live.checkpointer.save(state)  # between stages: the next one starts from model_path


def start_from(live: LiveRun, folder: str) -> None:
    """A stage's `start`: the policy is an earlier checkpoint again (`folder` under checkpoints/), in the engines
    too; evaluated there, it is the stage's `before` (logged, so the held-out curve shows the branch)."""
    state, path = live.state, live.run_dir / "checkpoints" / folder
    if Path(state.model_path) == path:
        return
    state.model_path = str(path)
    live.pool.sync_weights(checkpoint_state(path))
    state.before = evaluate_policy(live.cfg, live.data, live.pool, live.scorer, live.logger, live.episodes)
    print(f"stage {state.stage}: starts from {folder}, held-out accuracy {accuracy_text(live.data.evals, state.before)}",
          flush=True)


def accuracy_text(sets: list[EvalSet], *metrics: dict) -> str:
    """The held-out accuracy of one evaluation or its change, then each further set's.

    >>> accuracy_text([], {"accuracy": 0.1}), accuracy_text([EvalSet("gsm8k", [], None)],
    ...     {"accuracy": 0.1, "gsm8k/accuracy": 0.02}, {"accuracy": 0.5, "gsm8k/accuracy": 0.03})
    ('0.100', '0.100 -> 0.500; gsm8k 0.020 -> 0.030')
    """
    def change(key: str) -> str:
        return " -> ".join(f"{m[key]:.3f}" if key in m else "?" for m in metrics)

    return "; ".join([change("accuracy")] + [f"{s.name} {change(f'{s.name}/accuracy')}" for s in sets])


def _close(pool, scorer, logger, cluster) -> None:
    for worker in (pool, scorer, logger):
        if worker is not None:
            worker.close()
    cluster.shutdown()


def copy_checkpoint(source: Path, target: Path) -> None:
    """Replace `target` by a copy of `source`, never leaving a half-copied folder under the final name."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def run_stage(ctx: StageContext, recipe_yaml: str) -> str:
    """Train one stage from ctx.model_path; returns the path of its checkpoint."""
    kind, trainer = STAGE_KINDS[ctx.stage.kind], ctx.workers.trainer  # validate() admits only STAGE_KINDS' kinds
    train = kind.load_train()
    if not kind.trains_model:  # e.g. average: a checkpoint made from earlier ones
        return train(ctx, recipe_yaml)
    train(ctx)
    if not ctx.syncs_every_step:
        ctx.workers.sync_policy()
    path = trainer.save(str(ctx.logger.run_dir / "checkpoints" / ctx.checkpoint_name), ctx.model_path, recipe_yaml,
                        {"stage": ctx.index, "kind": ctx.stage.kind})
    ctx.workers.cluster.release(trainer)
    return path
