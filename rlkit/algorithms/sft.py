"""Supervised fine-tuning on (prompt, response) token pairs; prompt tokens are masked out of the loss."""

from __future__ import annotations

from rlkit.algorithms.common import StageContext, encode_prompt, encode_response
from rlkit.data import BatchSampler
from rlkit.trainer import pack_sequences

Example = tuple[list[int], list[int]]  # (prompt ids, response ids ending in EOS)


def train(ctx: StageContext) -> None:
    """SFT on the training split's gold solutions."""
    tok = ctx.tokenizer
    fit(ctx, [(encode_prompt(tok, p.prompt), encode_response(tok, p.solution)) for p in ctx.train])


def fit(ctx: StageContext, examples: list[Example], extra: dict | None = None) -> None:
    """stage.steps SFT steps of stage.batch_size examples, reshuffled each epoch. `extra` is kept with resume
    points (stages that built `examples` themselves store them there, so a resumed stage reuses them)."""
    sampler = BatchSampler(examples, ctx.stage.batch_size, ctx.seed())
    for step in ctx.steps(sampler, extra=extra):
        prompts, responses = zip(*sampler.next())
        batch = pack_sequences(list(prompts), list(responses), ctx.tokenizer.pad_token_id)
        # every response token in the step batch weighs the same, whichever rank or micro-batch holds it
        metrics = ctx.trainer.sft_step(batch, float(batch.response_mask.sum()))
        if ctx.log_step(step, metrics):
            ctx.show(loss=f"{metrics['loss']:.3f}")
