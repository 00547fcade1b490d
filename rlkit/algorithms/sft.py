"""Supervised fine-tuning: next-token NLL on the trained tokens only (a solution or completion after its prompt, or
every assistant turn of a conversation; rlkit.data.chat builds the masks)."""

from __future__ import annotations

import torch

from rlkit.algorithms.common import StageContext
from rlkit.data.chat import Example
from rlkit.data.tasks import BatchSampler
from rlkit.training.losses import SFTLoss
from rlkit.training.batches import SFTBatch, TokenBatch

SFT_LOSS = SFTLoss()


def train(ctx: StageContext) -> None:
    """SFT on the stage's examples, rendered when the data was prepared."""
    fit(ctx, ctx.data.examples)


def pack_examples(examples: list[Example], pad_id: int) -> TokenBatch:
    """Right-padded (ids, loss mask) examples; target t (token t + 1) counts where the mask marks token t + 1.

    >>> batch = pack_examples([([1, 5, 6, 7, 2], [0, 0, 0, 1, 1]), ([1, 9], [0, 1])], pad_id=0)
    >>> batch.input_ids.tolist(), batch.response_mask.tolist()
    ([[1, 5, 6, 7, 2], [1, 9, 0, 0, 0]], [[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, L)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    response_mask = torch.zeros((len(examples), width - 1))  # (B, L-1)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        response_mask[i, : len(ids) - 1] = torch.tensor(mask[1:], dtype=torch.float32)
    return TokenBatch(input_ids, attention, response_mask)


def prompt_reply(prompt: list[int], reply: list[int]) -> Example:
    """A prompt and its reply as one example, the reply trained."""
    return list(prompt) + list(reply), [0] * len(prompt) + [1] * len(reply)


def fit(ctx: StageContext, examples: list[Example], extra: dict | None = None) -> None:
    """stage.steps SFT steps of stage.batch_size examples, reshuffled each epoch. `extra` is kept with resume
    points (stages that built `examples` themselves store them there, so a resumed stage reuses them)."""
    sampler = BatchSampler(examples, ctx.stage.batch_size, ctx.seed())
    for step in ctx.loop.steps(sampler, extra=extra):
        batch = pack_examples(sampler.next(), ctx.data.renderer.pad_id)
        # every response token in the step batch weighs the same, whichever rank or micro-batch holds it
        update = ctx.workers.trainer.step(SFT_LOSS, SFTBatch(batch, float(batch.response_mask.sum())))
        if ctx.log.step(step, update.metrics()):
            ctx.log.show(loss=f"{update.stats.loss:.3f}")
