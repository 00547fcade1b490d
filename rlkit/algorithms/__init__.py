"""Stage algorithms: each module has `train(ctx)` that runs one stage of a recipe; `STAGES` says how the runner
drives each kind (rlkit.config.STAGE_KINDS, which validation checks recipes against, names the same kinds: a test
holds the two equal)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rlkit.algorithms import dpo, grpo, online_dpo, ppo, rft, sft


@dataclass(frozen=True)
class Stage:
    train: Callable | None  # train(ctx); None: no training (average, run by the runner from earlier checkpoints)
    syncs_every_step: bool = False  # the engines follow the trainer after every step (else once, at the end)


def train_dpo(ctx) -> None:
    """DPO on pairs from a dataset or the starting policy, or sampled round after round (`pairs: online`)."""
    (online_dpo.train if ctx.stage.pairs == "online" else dpo.train)(ctx)


STAGES = {
    "sft": Stage(sft.train),
    "dpo": Stage(train_dpo),
    "rft": Stage(rft.train),
    "distill": Stage(rft.train),
    "grpo": Stage(grpo.train, syncs_every_step=True),
    "ppo": Stage(ppo.train, syncs_every_step=True),
    "average": Stage(None),
}
