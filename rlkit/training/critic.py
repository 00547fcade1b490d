"""The PPO critic: the language model's body with a scalar value head, trained on GAE returns."""

from __future__ import annotations

import torch

from rlkit.recipe import TrainerConfig
from rlkit.training.packing import layout_rows
from rlkit.training.rank import (RankWorker, autocast_dtype, compile_blocks, enable_gradient_checkpointing, prepare_torch,
                        pretrained_kwargs, resolve_dtype, to_device)
from rlkit.training.batches import TokenBatch, ValueBatch, rank_part


class ValueModel(torch.nn.Module):
    """V(prefix) for every target position: the value of the state that predicts token t + 1. Its head reads the
    response positions alone, of rows packed into one sequence (`packing`) or right-padded (rlkit.training.packing)."""

    def __init__(self, body: torch.nn.Module, packing: bool = False, autocast: torch.dtype | None = None):
        super().__init__()
        self.body, self.packing, self.autocast = body, packing, autocast
        self.head = torch.nn.Linear(body.config.hidden_size, 1, dtype=body.dtype)
        torch.nn.init.zeros_(self.head.weight)  # start from V = 0 so early advantages are the raw returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        layout = layout_rows(batch.input_ids, batch.attention_mask, batch.response_mask, self.packing)
        hidden = layout.hidden(self.body, self.autocast)  # (N, H) at the response targets
        return layout.scatter(self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float())  # (B, L-1)


class CriticTrainer(RankWorker):
    """One rank of the critic, initialised from the policy checkpoint's transformer body."""

    def __init__(self, cfg: TrainerConfig, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0,
                 rank: int = 0, world_size: int = 1):
        from transformers import AutoModel

        prepare_torch(cfg)
        cfg = resolve_dtype(cfg)
        body = AutoModel.from_pretrained(model_path, **pretrained_kwargs(cfg))
        enable_gradient_checkpointing(body, cfg)
        compile_blocks(list(body.layers), cfg.compile)
        model = ValueModel(body, cfg.packing, autocast_dtype(cfg, world_size))
        super().__init__(cfg, model, list(body.layers), lr, warmup_steps, rank, world_size, total_steps)

    @torch.no_grad()
    def values(self, batch: TokenBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L-1) values of this rank's `rows` of the batch (None: all), zero off the response."""
        batch = rank_part(batch, rows)
        self.model.eval()
        out = torch.zeros(batch.response_mask.shape)  # float32, as the head's values, on the CPU
        for rows in self.micro_batches(batch):
            out[rows] = self.model(to_device(batch.select(rows), self.device)).cpu()
        return out

    def forward(self, loss, batch: ValueBatch) -> torch.Tensor:
        """A micro-batch's (b, L-1) values, for `step` (rlkit.training.losses.ValueLoss)."""
        return self.model(batch.tokens)
