"""The trainer: a causal LM, its optimizer and schedule, and per-token log-probs through the fused kernel.

A step takes the whole step batch, splits it into micro-batches and accumulates gradients. Losses are sums
divided by a normaliser the caller computes over the whole step batch, so the update does not depend on the
micro-batch size (see rlkit.losses).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from kernels import fused_logprobs
from rlkit.config import TrainerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBatch:
    """Prompt + response sequences, right-padded. Target position t predicts input_ids[:, t + 1]."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    response_mask: torch.Tensor  # (B, L - 1) float, 1 where the target token is part of the response

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: slice | torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.response_mask[index])


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    """Concatenate each prompt with its response; only response tokens are targets."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    batch, width = len(prompts), max(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width - 1))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention[i, : len(p) + len(r)] = 1
        # Target at t is token t + 1, so response tokens [len(p), len(p) + len(r)) are targets [len(p) - 1, ...).
        response_mask[i, len(p) - 1 : len(p) + len(r) - 1] = 1.0
    return TokenBatch(input_ids, attention, response_mask)


def sequence_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    temperature: float = 1.0,
    impl: str = "auto",
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, L-1) of the targets under `model`, zero off the response; never full logits."""
    body = getattr(model, model.base_model_prefix)  # the transformer without its LM head
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state  # (B, L, H)
    targets = batch.input_ids[:, 1:].masked_fill(batch.response_mask == 0, -100)  # (B, L-1)
    weight = model.get_output_embeddings().weight  # (V, H)
    return fused_logprobs(
        hidden[:, :-1], weight, targets, temperature=temperature, return_entropy=return_entropy, impl=impl
    )


@torch.no_grad()
def batched_logprobs(
    model: torch.nn.Module, batch: TokenBatch, micro_batch_size: int, temperature: float = 1.0, impl: str = "auto"
) -> torch.Tensor:
    """(B, L-1) log-probs without gradients, computed micro-batch by micro-batch."""
    parts = [
        sequence_logprobs(model, batch.select(slice(i, i + micro_batch_size)), temperature, impl)[0]
        for i in range(0, len(batch), micro_batch_size)
    ]
    return torch.cat(parts)  # micro-batches share the step batch's width


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to the base learning rate, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


class Trainer:
    """Owns the optimisation of `model` for one stage."""

    def __init__(self, model: torch.nn.Module, cfg: TrainerConfig, lr: float, warmup_steps: int):
        self.model, self.cfg = model, cfg
        self.optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_constant(warmup_steps))
        self.step_count = 0

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, L-1) log-probs without gradients (the "old" policy of a PPO-style update)."""
        self.model.eval()
        return batched_logprobs(self.model, batch, self.cfg.micro_batch_size, temperature, self.cfg.logprob_impl)

    def step(self, micro_losses: Callable[[TokenBatch, slice], tuple[torch.Tensor, dict]], batch: TokenBatch) -> dict:
        """One optimizer update over `batch`.

        `micro_losses(mb, rows)` returns (loss already divided by the global normaliser, metrics to sum);
        `rows` locates the micro-batch in the step batch so callers can slice per-sequence tensors.
        """
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        size = self.cfg.micro_batch_size
        for start in range(0, len(batch), size):
            rows = slice(start, start + size)
            loss, metrics = micro_losses(batch.select(rows), rows)
            loss.backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step_count}; lower the learning rate")
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        totals["grad_norm"] = float(grad_norm)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return totals

