"""Model averaging (`average`): the weights of a stage's last checkpoints, averaged (Llama 3; LAWA).

The source stage (`stage.source`, a stage name or checkpoint folder; default: the previous stage) keeps
snapshots with `save_every`; its final checkpoint is the newest. The last `stage.last` of them are averaged,
uniformly or as an EMA (`ema_decay`^age, normalised, so the newest weighs most). The stage logs the held-out
metrics of the last checkpoint as `<stage>/last/<metric>` beside the runner's before/after of the average.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlkit.algorithms.common import StageContext
from rlkit.recipe import RecipeError
from rlkit.recipe.stage_kinds import average_source, unknown_source_error


def mixing_weights(n: int, method: str, decay: float) -> list[float]:
    """Weights of n checkpoints, oldest first.

    >>> mixing_weights(3, "uniform", 0.5)
    [0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    >>> [round(w, 4) for w in mixing_weights(3, "ema", 0.5)]  # 0.25, 0.5, 1 normalised by 1.75
    [0.1429, 0.2857, 0.5714]
    """
    raw = [1.0] * n if method == "uniform" else [decay ** (n - 1 - i) for i in range(n)]
    return [w / sum(raw) for w in raw]


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i · state_i per tensor, accumulated in float64 and returned in each tensor's own dtype."""
    keys = states[0].keys()
    for i, s in enumerate(states[1:], 1):
        if s.keys() != keys:
            raise RecipeError(f"average: checkpoint {i} has other tensors than checkpoint 0; they are not one model")
    return {k: sum(w * s[k].double() for w, s in zip(weights, states)).to(states[0][k].dtype) for k in keys}


def source_checkpoints(ctx: StageContext) -> list[Path]:
    """The source stage's snapshots then its final checkpoint, oldest first."""
    folder = average_source(ctx.cfg.stages, ctx.index)  # validated when the recipe loaded
    if folder is None:
        raise unknown_source_error(ctx.cfg.stages, ctx.index)
    root = ctx.logger.run_dir / "checkpoints"
    snapshots = sorted((root / f"{folder}.snapshots").glob("step_*"))
    return [p for p in snapshots if any(p.glob("*.safetensors"))] + [root / folder]


def run(ctx: StageContext, recipe_yaml: str) -> str:
    """Average, save as the stage's checkpoint, point the engines at it; returns its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlkit.training.modeling import checkpoint_state, save_checkpoint

    paths = source_checkpoints(ctx)[-ctx.stage.last:]
    if len(paths) < 2:
        print(f"stage {ctx.index} (average): only {len(paths)} checkpoint of the source stage; set save_every on "
              "it to keep snapshots", flush=True)
    last = paths[-1]
    ctx.workers.pool.sync_weights(checkpoint_state(last))
    last_metrics = ctx.evaluate(log=False)
    weights = mixing_weights(len(paths), ctx.stage.method, ctx.stage.ema_decay)
    averaged = average_state_dicts([checkpoint_state(p) for p in paths], weights)
    model = AutoModelForCausalLM.from_pretrained(last)
    loaded = model.load_state_dict(averaged, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # saved once, with the embedding
    if set(loaded.missing_keys) - tied or loaded.unexpected_keys:
        raise RecipeError(f"stages.{ctx.index}: the averaged tensors do not fit the model (missing "
                          f"{loaded.missing_keys[:3]}, unexpected {loaded.unexpected_keys[:3]})")
    path = save_checkpoint(model, AutoTokenizer.from_pretrained(last), ctx.logger.run_dir / "checkpoints" /
                           ctx.checkpoint_name, recipe_yaml,
                           {"stage": ctx.index, "kind": "average", "averaged": [p.name for p in paths],
                            "weights": weights})
    ctx.workers.pool.sync_weights({k: v for k, v in model.state_dict().items()})
    ctx.logger.log({f"{ctx.prefix}/num_averaged": len(paths)}
                   | {f"{ctx.prefix}/last/{k}": v for k, v in last_metrics.items()})
    print(f"stage {ctx.index} (average of {len(paths)}): last checkpoint held-out accuracy "
          f"{last_metrics['accuracy']:.3f}", flush=True)
    return str(path)
