"""The PPO critic: the language model's body with a scalar value head, trained on GAE returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlkit.config import AlgoConfig, TrainerConfig
from rlkit.losses import value_loss
from rlkit.trainer import RankWorker, TokenBatch, prepare_torch


@dataclass(frozen=True)
class ValueBatch:
    tokens: TokenBatch  # (B, L)
    mask: torch.Tensor  # (B, L-1)
    old_values: torch.Tensor  # (B, L-1) critic at sampling time
    returns: torch.Tensor  # (B, L-1) GAE returns
    normalizer: float  # counted tokens in the whole step batch

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice) -> "ValueBatch":
        return ValueBatch(self.tokens.select(rows), self.mask[rows], self.old_values[rows], self.returns[rows],
                          self.normalizer)


class ValueModel(torch.nn.Module):
    """V(prefix) for every target position: the value of the state that predicts token t + 1."""

    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body
        self.head = torch.nn.Linear(body.config.hidden_size, 1, dtype=body.dtype)
        torch.nn.init.zeros_(self.head.weight)  # start from V = 0 so early advantages are the raw returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        hidden = self.body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        return self.head(hidden[:, :-1]).squeeze(-1).float() * batch.response_mask  # (B, L-1)


class CriticTrainer(RankWorker):
    """One rank of the critic, initialised from the policy checkpoint's transformer body."""

    def __init__(self, cfg: TrainerConfig, algo: AlgoConfig, model_path: str, lr: float, warmup_steps: int,
                 rank: int = 0, world_size: int = 1):
        from transformers import AutoModel

        prepare_torch(cfg)
        self.algo = algo
        body = AutoModel.from_pretrained(model_path, dtype=getattr(torch, cfg.dtype))
        super().__init__(cfg, ValueModel(body), list(body.layers), lr, warmup_steps, rank, world_size)

    @torch.no_grad()
    def values(self, batch: TokenBatch) -> torch.Tensor:
        """(b, L-1) values of this rank's rows, zero off the response."""
        self.model.eval()
        size = self.cfg.micro_batch_size
        return torch.cat([self.model(batch.select(slice(i, i + size))) for i in range(0, len(batch), size)])

    def value_step(self, batch: ValueBatch) -> dict[str, float]:
        def micro_loss(mb: ValueBatch):
            loss, clipped = value_loss(self.model(mb.tokens), mb.old_values, mb.returns, mb.mask,
                                       self.algo.value_clip, mb.normalizer)
            return loss, {"value_loss": loss.detach(), "value_clip_fraction": clipped.sum() / mb.normalizer}

        return self._step(micro_loss, batch)
