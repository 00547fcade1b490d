"""Reward models: a scalar (Bradley-Terry) or per-step (process) score head on the policy's transformer, its losses
and its trainer rank.

- Outcome model: `AutoModelForSequenceClassification` with one label, trained on preference pairs with TRL's
  RewardTrainer loss, -log sigmoid(r_chosen - r_rejected - margin) (the `margin` column, 0 without), plus
  `center_coef` x (r_chosen + r_rejected)^2 (TRL's center_rewards_coefficient, Eisenstein et al. 2023). A sequence's
  reward is read at its last token that is not the pad token, exactly where transformers' sequence classifiers read
  it, so the saved folder scores the same anywhere.
- Process model (PRM): `AutoModelForTokenClassification` with two labels, as TRL's PRMTrainer, trained with
  cross-entropy at each step's separator token. With two classes that is binary cross-entropy on d = logit_1 -
  logit_0, which is the step's score here (its probability of being correct is sigmoid(d) = softmax(logits)[1]).

Both sums are divided by the step batch's pairs (or labelled steps), so micro-batches and ranks sum to the full
update (rlkit.training.losses). The head reads the scored positions alone, of rows packed or right-padded
(rlkit.training.packing). Checkpoints are plain Hugging Face folders (LoRA merged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from rlkit.recipe import TrainerConfig
from rlkit.training.batches import RewardPairBatch, StepBatch, TokenBatch, rank_part
from rlkit.training.lora import apply_lora
from rlkit.training.losses import Stats
from rlkit.training.packing import layout_rows
from rlkit.training.rank import (RankWorker, autocast_dtype, compile_blocks, enable_gradient_checkpointing,
                                 prepare_torch, pretrained_kwargs, resolve_dtype, to_device)

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center_coef: float = 0.0) -> torch.Tensor:
    """(P,) per-pair loss: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (TRL's RewardTrainer, whose
    mean over pairs is this loss's mean).

    >>> bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == torch.log(torch.tensor(2.0)).item()
    True
    """
    return -F.logsigmoid(chosen - rejected - margin) + center_coef * (chosen + rejected) ** 2


def step_loss(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-step loss at the masked positions: binary cross-entropy of label given d = logit_1 - logit_0, the
    two-class cross-entropy of TRL's PRMTrainer (log(1 + e^-d) for a correct step, log(1 + e^d) for a wrong one)."""
    return F.binary_cross_entropy_with_logits(scores, labels, reduction="none") * mask


def last_token(ids: list[int], pad_id: int) -> int:
    """Where a sequence classifier reads a sequence's score: its last token that is not the pad token
    (transformers' GenericForSequenceClassification; a sequence ending in pad = EOS is read before it).

    >>> last_token([5, 6, 2], pad_id=0), last_token([5, 6, 2], pad_id=2)
    (2, 1)
    """
    return max((i for i, t in enumerate(ids) if t != pad_id), default=0)


def scored_tokens(rows: list[list[int]], positions: list[list[int]], pad_id: int) -> TokenBatch:
    """Rows right-padded to (B, W + 1) (one pad column more, so every token has a target position) with
    response_mask (B, W) marking the positions each row is scored at.

    >>> batch = scored_tokens([[1, 5, 6], [1, 9]], [[2], [1]], pad_id=0)
    >>> batch.input_ids.tolist(), batch.response_mask.tolist()
    ([[1, 5, 6, 0], [1, 9, 0, 0]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    """
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width + 1), pad_id, dtype=torch.long)  # (B, W+1)
    attention = torch.zeros((len(rows), width + 1), dtype=torch.long)
    mask = torch.zeros((len(rows), width))  # (B, W)
    for i, (ids, where) in enumerate(zip(rows, positions)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        mask[i, list(where)] = 1.0
    return TokenBatch(input_ids, attention, mask)


@dataclass(frozen=True)
class RewardStats(Stats):  # each divided by the step batch's pairs (or steps)
    loss: float
    accuracy: float  # pairs with r_chosen > r_rejected (a PRM: steps whose sign of d matches the label)
    margin: float  # mean r_chosen - r_rejected over pairs (a PRM: 0, it has no pairs)


@dataclass(frozen=True)
class PairwiseLoss:
    """The Bradley-Terry loss (`bradley_terry_loss`) over the step batch's pairs; `out` is the (b, T) score table."""

    center_coef: float = 0.0

    def __call__(self, out: torch.Tensor, batch: RewardPairBatch) -> tuple[torch.Tensor, RewardStats]:
        rewards = out.sum(-1)  # (b,) each row's one scored position
        chosen, rejected = rewards[0::2], rewards[1::2]  # (b/2,)
        loss = bradley_terry_loss(chosen, rejected, batch.margins[0::2], self.center_coef).sum() / batch.num_pairs
        gap = (chosen - rejected).detach()
        return loss, RewardStats(float(loss.detach()), float((gap > 0).sum()) / batch.num_pairs,
                                 float(gap.sum()) / batch.num_pairs)


@dataclass(frozen=True)
class StepLoss:
    """A PRM's per-step cross-entropy (`step_loss`) over the step batch's labelled steps."""

    center_coef: ClassVar[float] = 0.0

    def __call__(self, out: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, RewardStats]:
        mask = batch.tokens.response_mask
        loss = step_loss(out, batch.labels, mask).sum() / batch.normalizer
        right = ((out.detach() > 0).float() == batch.labels).float() * mask
        return loss, RewardStats(float(loss.detach()), float(right.sum()) / batch.normalizer, 0.0)


class ScoreModel(torch.nn.Module):
    """A Hugging Face classification model (`lm`) seen as tokens -> its score at the positions response_mask marks:
    the scalar (one label) or logit_1 - logit_0 (two labels). The FSDP2 root unit, like the policy's LogprobModel."""

    def __init__(self, lm: torch.nn.Module, packing: bool = False, autocast: torch.dtype | None = None):
        super().__init__()
        self.lm, self.packing, self.autocast = lm, packing, autocast

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        layout = layout_rows(batch.input_ids, batch.attention_mask, batch.response_mask, self.packing)
        hidden = layout.hidden(getattr(self.lm, self.lm.base_model_prefix), self.autocast)  # (N, H)
        head = self.lm.score
        logits = head(hidden.to(head.weight.dtype))  # (N, labels)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up to float32; float64 stays
        values = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]  # (N,)
        return layout.scatter(values)  # (B, L-1)


def classification_class(process: bool):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForTokenClassification if process else AutoModelForSequenceClassification


class RewardModelTrainer(RankWorker):
    """One rank of a reward model, initialised from the policy checkpoint's transformer with a new score head (one
    label, or two for a PRM); trainer.lora_rank trains adapters and the head over the frozen body."""

    def __init__(self, cfg: TrainerConfig, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0,
                 process: bool = False, rank: int = 0, world_size: int = 1):
        from rlkit.training.modeling import load_tokenizer

        from transformers.utils import logging as hf_logging

        prepare_torch(cfg)
        cfg = resolve_dtype(cfg)
        pad_id = load_tokenizer(model_path).pad_token_id
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its report of the new head and the unused LM head is expected
        try:
            lm = classification_class(process).from_pretrained(model_path, num_labels=2 if process else 1,
                                                               pad_token_id=pad_id, **pretrained_kwargs(cfg))
        finally:
            hf_logging.set_verbosity(verbosity)
        log.info("reward model: a new %s head on %s's transformer", "two-label step" if process else "scalar",
                 model_path)
        if cfg.lora_rank:
            lm = apply_lora(lm, cfg)
            lm.score.weight.requires_grad_(True)  # the new head always trains (PEFT's modules_to_save)
            if lm.score.bias is not None:
                lm.score.bias.requires_grad_(True)
        enable_gradient_checkpointing(lm, cfg)
        blocks = list(getattr(lm, lm.base_model_prefix).layers)
        compile_blocks(blocks, cfg.compile)
        model = ScoreModel(lm, cfg.packing, autocast_dtype(cfg, world_size))
        super().__init__(cfg, model, blocks, lr, warmup_steps, rank, world_size, total_steps)

    def forward(self, loss, batch) -> torch.Tensor:
        """A micro-batch's (b, L-1) scores, for `step`."""
        return self.model(batch.tokens)

    @torch.no_grad()
    def scores(self, batch: TokenBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, L-1) scores of this rank's `rows` of the batch (None: all) at their marked positions, zero elsewhere."""
        batch = rank_part(batch, rows)
        self.model.eval()
        out = None
        for rows in self.micro_batches(batch):
            part = self.model(to_device(batch.select(rows), self.device)).cpu()  # (b, L-1)
            out = part.new_zeros(batch.response_mask.shape) if out is None else out
            out[rows] = part
        return batch.response_mask.new_zeros(batch.response_mask.shape) if out is None else out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights on CPU under the classification model's names, LoRA merged (every rank calls it)."""
        return self.gathered_state()

    def save(self, path: str, tokenizer_path: str, recipe_yaml: str, extra: dict | None = None) -> str | None:
        """A Hugging Face sequence- (or token-) classification folder with the policy's tokenizer (rank 0 writes)."""
        from rlkit.training.modeling import load_tokenizer, save_checkpoint

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        config = self.model.lm.config
        model = classification_class(config.num_labels == 2).from_config(config, dtype=getattr(torch, self.cfg.dtype))
        model.load_state_dict(state)
        return str(save_checkpoint(model, load_tokenizer(tokenizer_path), Path(path), recipe_yaml, extra))
