"""The frozen reference model: log-probs of sampled responses and the KL of the policy to it."""

from __future__ import annotations

import copy

import torch

from rlkit.config import RefConfig
from rlkit.losses import kl_estimate
from rlkit.trainer import TokenBatch, batched_logprobs


class ReferenceModel:
    """A frozen snapshot of the policy at the start of a stage (DPO's and GRPO's anchor)."""

    def __init__(self, cfg: RefConfig, model: torch.nn.Module, micro_batch_size: int = 64, impl: str = "auto"):
        self.cfg, self.micro_batch_size, self.impl = cfg, micro_batch_size, impl
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, L-1) reference log-probs of the response tokens (zero elsewhere)."""
        return batched_logprobs(self.model, batch, self.micro_batch_size, temperature, self.impl)

    def kl(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token KL estimate with the configured estimator."""
        return kl_estimate(logprobs, ref_logprobs, self.cfg.kl_estimator)
