"""Supervised fine-tuning on (prompt, solution) pairs; prompt tokens are masked out of the loss."""

from __future__ import annotations

from rlkit.algorithms.common import StageContext, encode_prompt, encode_response
from rlkit.data import BatchSampler
from rlkit.trainer import pack_sequences


def train(ctx: StageContext) -> None:
    stage, tok = ctx.stage, ctx.tokenizer
    sampler = BatchSampler(ctx.train, stage.batch_size, ctx.seed())
    bar = ctx.logger.progress(stage.steps, f"{ctx.index}:{ctx.prefix}")
    for step in range(stage.steps):
        problems = sampler.next()
        batch = pack_sequences(
            [encode_prompt(tok, p.prompt) for p in problems],
            [encode_response(tok, p.solution) for p in problems],
            tok.pad_token_id,
        )
        # every response token in the step batch weighs the same, whichever rank or micro-batch holds it
        metrics = ctx.trainer.sft_step(batch, float(batch.response_mask.sum()))
        if ctx.log_step(step, metrics):
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        ctx.maybe_evaluate(step)
        bar.update(1)
    bar.close()
