"""The frozen reference model: log-probs of sampled responses, the anchor of DPO and of the KL term."""

from __future__ import annotations

import torch

from rlkit.config import RefConfig
from rlkit.trainer import TokenBatch, batched_logprobs


class ReferenceModel:
    """A frozen copy of the model a stage starts from, loaded from that checkpoint."""

    def __init__(self, cfg: RefConfig, model_path: str, micro_batch_size: int = 64, impl: str = "auto"):
        from transformers import AutoModelForCausalLM

        self.cfg, self.micro_batch_size, self.impl = cfg, micro_batch_size, impl
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, L-1) reference log-probs of the response tokens (zero elsewhere)."""
        return batched_logprobs(self.model, batch, self.micro_batch_size, temperature, self.impl)
