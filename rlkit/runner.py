"""Run a recipe: its stages in order, each continuing from the previous stage's weights.

Phases: check every input (cheap) → build the model → start the rollout engine → for each stage: evaluate,
train, save a Hugging Face checkpoint with the resolved recipe beside it, evaluate again.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlkit.advantages import get_estimator
from rlkit.algorithms import dpo, grpo, ppo, sft
from rlkit.algorithms.common import StageContext
from rlkit.cluster import Cluster
from rlkit.config import RecipeConfig, RecipeError, to_yaml
from rlkit.data import load_splits
from rlkit.evaluate import evaluate
from rlkit.modeling import init_model, save_checkpoint
from rlkit.tracking import RunLogger

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: RecipeConfig) -> Path:
    """Create the run directory; refuse to write into an existing one unless `logging.overwrite`."""
    run_dir = Path(cfg.logging.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.logging.overwrite:
        raise RecipeError(
            f"logging.output_dir: '{run_dir}' already holds a run; choose another folder or set logging.overwrite=true"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run(cfg: RecipeConfig) -> dict:
    """Run every stage; returns the summary (held-out accuracy before and after each stage)."""
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    recipe_yaml = to_yaml(cfg)
    train_set, held_out = load_splits(cfg.data)  # bad data fails here, before any heavy work
    if any(s.kind == "grpo" for s in cfg.stages):
        get_estimator(cfg.algo.advantage_estimator)  # an unknown estimator or import path fails here too
    cluster = Cluster(cfg)
    scorer = cluster.scorer()  # unknown rewards or import paths fail here, before anything is written
    run_dir = prepare_run_dir(cfg)
    (run_dir / "recipe.yaml").write_text(recipe_yaml)
    logger = RunLogger(cfg.logging, run_dir, OmegaConf.to_container(OmegaConf.create(recipe_yaml)))
    model, tokenizer = init_model(cfg.model)
    model_path = str(save_checkpoint(model, tokenizer, run_dir / "checkpoints" / "00_init", recipe_yaml))
    del model  # from here on the trainer group owns the weights
    pool = cluster.rollout_pool(model_path)
    summary: dict = {"stages": []}
    best: dict = {}  # the best held-out value so far (logging.best_metric), for checkpoints/best
    started = time.perf_counter()
    try:
        before = evaluate(pool, tokenizer, scorer, held_out, cfg.logging.eval_temperature)
        logger.log({f"eval/{k}": v for k, v in before.items()})
        print(f"held-out accuracy before training: {before['accuracy']:.3f}", flush=True)
        for index, stage in enumerate(cfg.stages):
            t0 = time.perf_counter()
            ctx = StageContext(cfg, stage, index, model_path, tokenizer, train_set,
                               cluster.trainer_group(model_path, cfg.stage_lr(index), cfg.stage_warmup(index)),
                               pool, scorer, cluster, logger, held_out, best)
            model_path = run_stage(ctx, recipe_yaml)
            after = evaluate(pool, tokenizer, scorer, held_out, cfg.logging.eval_temperature)
            logger.log({f"eval/{k}": v for k, v in after.items()})
            if ctx.is_best(after):
                copy_checkpoint(Path(model_path), run_dir / "checkpoints" / "best")
            seconds = time.perf_counter() - t0
            print(
                f"stage {index} ({stage.kind}): held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
                f"({seconds:.0f}s)",
                flush=True,
            )
            summary["stages"].append(
                {"name": Path(model_path).name, "kind": stage.kind, "before": before, "after": after, "seconds": seconds}
            )
            before = after
        summary["seconds"] = time.perf_counter() - started
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.summary({f"final/{k}": v for k, v in before.items()})
    finally:
        pool.close()
        scorer.close()
        logger.close()
        cluster.shutdown()
    return summary


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
    kind, trainer = ctx.stage.kind, ctx.trainer
    if kind == "sft":
        sft.train(ctx)
    elif kind == "dpo":
        dpo.train(ctx)
    elif kind == "grpo":
        grpo.train(ctx)
    elif kind == "ppo":
        ppo.train(ctx)
    else:  # validate() admits only the kinds above
        raise RecipeError(f"stages.{ctx.index}.kind: '{kind}' is not implemented")
    if kind in ("sft", "dpo"):  # GRPO and PPO sync after every step already
        ctx.pool.sync_weights(trainer.state_dict())
    name = ctx.stage.name or f"{ctx.index + 1:02d}_{kind}"
    path = trainer.save(str(ctx.logger.run_dir / "checkpoints" / name), ctx.model_path, recipe_yaml,
                        {"stage": ctx.index, "kind": kind})
    ctx.cluster.release(trainer)
    return path
