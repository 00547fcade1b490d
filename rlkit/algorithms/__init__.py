"""Stage algorithms: each module has `train(ctx)` that runs one stage of a recipe; `STAGES` maps each kind to it.
What a kind is to a recipe (its fields, rows per step, checks, whether it syncs every step) is
rlkit.recipe.stage_kinds.STAGE_KINDS; a test holds the two tables to the same kinds."""

from __future__ import annotations

from typing import Callable

from rlkit.algorithms import dpo, grpo, online_dpo, ppo, rft, sft


def train_dpo(ctx) -> None:
    """DPO on pairs from a dataset or the starting policy, or sampled round after round (`pairs: online`)."""
    (online_dpo.train if ctx.stage.pairs == "online" else dpo.train)(ctx)


# kind -> train(ctx); None: no training (average, run by the runner from earlier checkpoints)
STAGES: dict[str, Callable | None] = {
    "sft": sft.train,
    "dpo": train_dpo,
    "rft": rft.train,
    "distill": rft.train,
    "grpo": grpo.train,
    "ppo": ppo.train,
    "average": None,
}
