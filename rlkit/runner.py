"""Run a recipe: its stages in order, each continuing from the previous stage's weights.

Phases: check every input (cheap) → build the model → start the rollout engine → for each stage: evaluate,
train, save a Hugging Face checkpoint with the resolved recipe beside it, evaluate again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlkit.algorithms import dpo, grpo, sft
from rlkit.algorithms.common import StageContext
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
    from rewards.scorer import Scorer  # starts verifier worker processes
    from rollout.vllm_engine import VllmRollout  # imports vLLM

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.trainer.seed)
    recipe_yaml = to_yaml(cfg)
    train_set, held_out = load_splits(cfg.data)  # bad data fails here, before any heavy work
    scorer = Scorer(cfg.reward)  # unknown rewards or import paths fail here
    run_dir = prepare_run_dir(cfg)
    (run_dir / "recipe.yaml").write_text(recipe_yaml)
    logger = RunLogger(cfg.logging, run_dir, OmegaConf.to_container(OmegaConf.create(recipe_yaml)))
    model, tokenizer = init_model(cfg.model)
    start_ckpt = save_checkpoint(model, tokenizer, run_dir / "checkpoints" / "00_init", recipe_yaml)
    engine = VllmRollout(cfg.rollout, str(start_ckpt), cfg.model.max_seq_len, seed=cfg.trainer.seed)
    summary: dict = {"stages": []}
    started = time.perf_counter()
    try:
        before = evaluate(engine, tokenizer, scorer, held_out, cfg.logging.eval_temperature)
        logger.log({f"eval/{k}": v for k, v in before.items()})
        print(f"held-out accuracy before training: {before['accuracy']:.3f}", flush=True)
        for index, stage in enumerate(cfg.stages):
            ctx = StageContext(cfg, stage, index, model, tokenizer, train_set, engine, scorer, logger)
            t0 = time.perf_counter()
            if stage.kind == "sft":
                sft.train(ctx)
            elif stage.kind == "dpo":
                dpo.train(ctx)
            elif stage.kind == "grpo":
                grpo.train(ctx)
            else:  # validate() admits only the kinds above
                raise RecipeError(f"stages.{index}.kind: '{stage.kind}' is not implemented")
            if stage.kind != "grpo":  # GRPO syncs after every step already
                engine.sync_weights(model.state_dict())
            name = stage.name or f"{index + 1:02d}_{stage.kind}"
            save_checkpoint(model, tokenizer, run_dir / "checkpoints" / name, recipe_yaml, {"stage": index, "kind": stage.kind})
            after = evaluate(engine, tokenizer, scorer, held_out, cfg.logging.eval_temperature)
            logger.log({f"eval/{k}": v for k, v in after.items()})
            seconds = time.perf_counter() - t0
            print(
                f"stage {index} ({stage.kind}): held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
                f"({seconds:.0f}s)",
                flush=True,
            )
            summary["stages"].append(
                {"name": name, "kind": stage.kind, "before": before, "after": after, "seconds": seconds}
            )
            before = after
        summary["seconds"] = time.perf_counter() - started
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.summary({f"final/{k}": v for k, v in before.items()})
    finally:
        engine.close()
        scorer.close()
        logger.close()
    return summary
