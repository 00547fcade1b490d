"""The batches a trainer rank updates on: small frozen dataclasses of tensors, with shapes, that cross from the
controller to the ranks (and across Ray actor boundaries). They sit at the bottom of the training layer and import
nothing of rlkit, so losses, experience and stages use them without importing the FSDP2 trainer.

Each has `len(batch)` (its rows) and `select(rows)` (the same batch over a subset of rows, its normaliser kept: the
loss divisor is the whole step batch's, so micro-batches and ranks sum to the full update).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch


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


@dataclass(frozen=True)
class SFTBatch:
    """An SFT update: its response tokens are the targets."""

    tokens: TokenBatch  # (B, L)
    normalizer: float  # response tokens in the whole step batch (the loss divisor)

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "SFTBatch":
        return SFTBatch(self.tokens.select(rows), self.normalizer)


@dataclass(frozen=True)
class PolicyBatch:
    """A GRPO/PPO update: sampled sequences with everything the clipped objective needs."""

    tokens: TokenBatch  # (B, L)
    mask: torch.Tensor  # (B, L-1) response tokens that count (excluded samples are zero)
    old_logprobs: torch.Tensor | None  # (B, L-1) sampling policy per the trainer; None: on-policy, the step's own
    ref_logprobs: torch.Tensor | None  # (B, L-1) frozen reference; None: no KL term (GRPO with ref.kl_coef 0)
    rollout_logprobs: torch.Tensor  # (B, L-1) the engine's log-probs of the sampled tokens
    advantages: torch.Tensor  # (B,) per sequence or (B, L-1) per token
    normalizer: float  # loss divisor over the whole step batch (tokens or sequences, by algo.loss_agg)

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "PolicyBatch":
        return PolicyBatch(
            self.tokens.select(rows), self.mask[rows], None if self.old_logprobs is None else self.old_logprobs[rows],
            None if self.ref_logprobs is None else self.ref_logprobs[rows], self.rollout_logprobs[rows],
            self.advantages[rows], self.normalizer,
        )


@dataclass(frozen=True)
class PairBatch:
    """A DPO update: rows alternate chosen (2i) and rejected (2i + 1)."""

    tokens: TokenBatch  # (2P, L)
    ref_logps: torch.Tensor  # (2P,) summed response log-probs under the reference
    num_pairs: int  # pairs in the whole step batch (the loss divisor)
    rows_per_unit: ClassVar[int] = 2  # a pair's rows stay together, in order, in one micro-batch

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "PairBatch":
        return PairBatch(self.tokens.select(rows), self.ref_logps[rows], self.num_pairs)


def rank_part(batch, rows: torch.Tensor | None = None, normalizer: float | None = None):
    """A rank's part of a step batch: its `rows` (None: all), as an optimizer step whose loss divisor is `normalizer`
    (None: the batch's own; a minibatch's is over its rows). The whole step batch crosses to every rank once, by
    reference (rlkit.runtime.cluster.TrainerGroup), and each rank takes its rows here.

    >>> b = SFTBatch(TokenBatch(torch.arange(6).view(3, 2), torch.ones(3, 2), torch.ones(3, 1)), normalizer=3.0)
    >>> part = rank_part(b, torch.tensor([2, 0]), normalizer=2.0)
    >>> part.tokens.input_ids.tolist(), part.normalizer, rank_part(b) is b
    ([[4, 5], [0, 1]], 2.0, True)
    """
    out = batch if rows is None else batch.select(rows)
    return out if normalizer is None else replace(out, normalizer=normalizer)


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


@dataclass(frozen=True)
class ValueBatch:
    """A PPO critic update: value targets (GAE returns) for the sampled sequences."""

    tokens: TokenBatch  # (B, L)
    mask: torch.Tensor  # (B, L-1)
    old_values: torch.Tensor  # (B, L-1) critic at sampling time
    returns: torch.Tensor  # (B, L-1) GAE returns
    normalizer: float  # counted tokens in the whole step batch

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "ValueBatch":
        return ValueBatch(self.tokens.select(rows), self.mask[rows], self.old_values[rows], self.returns[rows],
                          self.normalizer)


@dataclass(frozen=True)
class RewardPairBatch:
    """A Bradley-Terry reward model update: rows alternate chosen (2i) and rejected (2i + 1); each row's
    response_mask marks the one position its reward is read at (rlkit.training.reward_model.scored_tokens)."""

    tokens: TokenBatch  # (2P, L)
    margins: torch.Tensor  # (2P,) the pair's required margin (TRL's `margin` column; 0 without), on both its rows
    num_pairs: int  # pairs in the whole step batch (the loss divisor)
    rows_per_unit: ClassVar[int] = 2  # a pair's rows stay together, in order, in one micro-batch

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "RewardPairBatch":
        return RewardPairBatch(self.tokens.select(rows), self.margins[rows], self.num_pairs)


@dataclass(frozen=True)
class StepBatch:
    """A process reward model update: response_mask marks each step's last separator token, `labels` its label."""

    tokens: TokenBatch  # (B, L)
    labels: torch.Tensor  # (B, L-1) 1.0 where the step ending there is correct, 0.0 elsewhere
    normalizer: float  # labelled steps in the whole step batch (the loss divisor)

    def __len__(self) -> int:
        return len(self.tokens)

    def select(self, rows: slice | torch.Tensor) -> "StepBatch":
        return StepBatch(self.tokens.select(rows), self.labels[rows], self.normalizer)
