"""Fused kernels on the training critical path: log-probs/entropy from hidden states, and advantages."""

from kernels.advantages import discounted_returns, gae, group_normalize, reverse_scan, rloo_advantages
from kernels.logprobs import fused_logprobs

__all__ = ["fused_logprobs", "group_normalize", "rloo_advantages", "discounted_returns", "gae", "reverse_scan"]
