"""The frozen reference model: log-probs of sampled responses, the anchor of DPO and of the KL term."""

from __future__ import annotations

import torch

from rlkit.training.attention import model_attn_implementation
from rlkit.recipe import RefConfig
from rlkit.training.packing import split_micro_batches
from rlkit.training.precision import torch_dtype
from rlkit.training.rank import compile_blocks, default_device, to_device
from rlkit.training.trainer import LogprobModel, batched_logprobs
from rlkit.training.batches import TokenBatch


def reference_dtype(cfg: RefConfig) -> torch.dtype:
    """ref.dtype on this worker's device, "auto" being bfloat16 where it is native, else float32 (rlkit.training.precision)."""
    return torch_dtype(cfg.dtype, default_device())


class ReferenceModel:
    """A frozen copy of the model a stage starts from, loaded from that checkpoint. Micro-batches follow the
    trainer's (at most `micro_batch_size` rows and `micro_batch_tokens` tokens, rows packed when `packing`), and
    so does `compile` (trainer.compile: its blocks' forward through torch.compile)."""

    def __init__(self, cfg: RefConfig, model_path: str, micro_batch_size: int = 64, impl: str = "auto",
                 micro_batch_tokens: int = 0, packing: bool = False, attn_implementation: str = "auto",
                 compile: bool = False):
        from transformers import AutoModelForCausalLM

        self.cfg, self.impl = cfg, impl
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        dtype = reference_dtype(cfg)
        attn = model_attn_implementation(attn_implementation, packing, dtype)
        lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn)
        compile_blocks(list(getattr(lm, lm.base_model_prefix).layers), compile)
        self.device = default_device()
        self.model = LogprobModel(lm, packing).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """(B, L-1) reference log-probs of the response tokens (zero elsewhere)."""
        lengths = batch.attention_mask.sum(-1).tolist()
        plan = split_micro_batches(lengths, self.micro_batch_size, self.micro_batch_tokens)
        return batched_logprobs(self.model, to_device(batch, self.device), [torch.tensor(rows) for rows in plan],
                                temperature, self.impl).cpu()  # (B, L-1) on the CPU, for the controller
