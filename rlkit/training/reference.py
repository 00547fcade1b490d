"""The frozen reference model: log-probs of sampled responses, the anchor of DPO and of the KL term."""

from __future__ import annotations

import torch

from rlkit.recipe import RefConfig
from rlkit.training.packing import split_micro_batches
from rlkit.training.rank import default_device, to_device
from rlkit.training.trainer import batched_logprobs, load_reference_model
from rlkit.training.batches import TokenBatch


class ReferenceModel:
    """A frozen copy of the model a stage starts from, loaded from that checkpoint, unsharded (ref.placement=actor;
    with "trainer" the policy's ranks hold it sharded: ShardedTrainer.load_reference, the same loader and
    micro-batches). Micro-batches follow the trainer's (at most `micro_batch_size` rows and `micro_batch_tokens`
    tokens, rows packed when `packing`), and so does `compile` (trainer.compile: its blocks' forward through
    torch.compile)."""

    def __init__(self, cfg: RefConfig, model_path: str, micro_batch_size: int = 64, impl: str = "auto",
                 micro_batch_tokens: int = 0, packing: bool = False, attn_implementation: str = "auto",
                 compile: bool = False):
        self.cfg, self.impl = cfg, impl
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.device = default_device()
        self.model = load_reference_model(cfg, model_path, packing, attn_implementation, compile).to(self.device)

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, L-1) reference log-probs of the response tokens (zero elsewhere)."""
        lengths = batch.attention_mask.sum(-1).tolist()
        plan = split_micro_batches(lengths, self.micro_batch_size, self.micro_batch_tokens)
        return batched_logprobs(self.model, to_device(batch, self.device), [torch.tensor(rows) for rows in plan],
                                temperature, self.impl).cpu()  # (B, L-1) on the CPU, for the controller
