"""Direct preference optimisation against a frozen reference (the stage's starting model).

Where the pairs come from (`stage.pairs`):
- `dataset`: the chosen/rejected pairs of a preference dataset (TRL's format), rendered with the chat template;
- `policy`: built from the starting policy before training: for each prompt, K samples are scored by the
  recipe's rewards; the gold solution is `chosen`, a sample the rewards judge wrong is `rejected`. Prompts whose
  samples are all correct give no pair;
- `online` (rlkit.algorithms.online_dpo): sampled from the policy round after round.
"""

from __future__ import annotations

import random

from rlkit.algorithms.common import StageContext
from rlkit.recipe import RecipeError
from rlkit.data.tasks import BatchSampler
from rlkit.training.losses import DPOLoss
from rlkit.training.batches import PairBatch, TokenBatch, pack_sequences
from rlkit.rewards.base import Verdict
from rlkit.rollout.generations import token_list

SAMPLES_PER_PROMPT = 4


def build_pairs(ctx: StageContext, num_prompts: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) triples from the policy's own wrong answers."""
    train, renderer = ctx.data.problems, ctx.data.renderer
    problems = random.Random(ctx.seed()).sample(train, min(num_prompts, len(train)))
    exp = ctx.experience_maker().make(problems, SAMPLES_PER_PROMPT, 1.0, ctx.seed())
    pairs = []
    for i, problem in enumerate(problems):
        for k in range(exp.group(i).start, exp.group(i).stop):
            if exp.scored.valid[k] and exp.scored.results[k].verdict != Verdict.CORRECT:
                pairs.append((exp.prompt_ids[i], renderer.reply_ids(problem, problem.solution),
                              token_list(exp.completions[k].token_ids)))
                break
    return pairs


def pack_pairs(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int) -> TokenBatch:
    """Rows alternate chosen, rejected: row 2i is pair i's chosen response, row 2i + 1 its rejected one."""
    prompts = [p for p, _, _ in pairs for _ in range(2)]
    responses = [r for _, c, rj in pairs for r in (c, rj)]
    return pack_sequences(prompts, responses, pad_id)


def train(ctx: StageContext) -> None:
    """Pairs from the dataset or sampled once from the starting policy (`pairs: online` is online_dpo.train)."""
    stage = ctx.stage
    pairs = ctx.loop.restored("pairs")  # a resumed stage keeps the pairs sampled from its starting policy
    if stage.pairs == "dataset":
        pairs = ctx.data.pairs  # rendered and length-checked when the data was prepared
    elif pairs is None:
        pairs = build_pairs(ctx, stage.steps * stage.batch_size)
        if not pairs:
            raise RecipeError(f"stages.{ctx.index}: the policy answered every sampled prompt correctly; no DPO pairs")
        ctx.logger.log({f"{ctx.prefix}/num_pairs": len(pairs)})
    ref = ctx.workers.cluster.reference(ctx.model_path, ctx.workers.trainer)
    sampler = BatchSampler(pairs, stage.batch_size, ctx.seed())
    with ctx.workers.releasing(ref):
        for step in ctx.loop.steps(sampler, extra={"pairs": pairs} if stage.pairs == "policy" else None):
            train_step(ctx, ref, step, sampler.next())


def train_step(ctx: StageContext, ref, step: int, pairs: list[tuple[list[int], list[int], list[int]]]) -> None:
    tokens = pack_pairs(pairs, ctx.data.renderer.pad_id)  # (2P, L)
    ref_logps = ref.logprobs(tokens).sum(-1)  # (2P,) summed response log-probs
    update = ctx.workers.trainer.step(DPOLoss.from_config(ctx.cfg.algo), PairBatch(tokens, ref_logps, len(tokens) // 2))
    if ctx.log.step(step, update.metrics()):
        ctx.log.show(loss=f"{update.stats.loss:.3f}", margin=f"{update.stats.reward_margin:.2f}")
