"""Fused kernels on the training critical path (a leaf, installed as rlkit.kernels): log-probs/entropy from hidden
states, and advantages. Imports torch (and triton on the GPU path) only, nothing else of rlkit."""

from rlkit.kernels.advantages import discounted_returns, gae, group_normalize, reverse_scan, rloo_advantages
from rlkit.kernels.logprobs import fused_logprobs

__all__ = ["fused_logprobs", "group_normalize", "rloo_advantages", "discounted_returns", "gae", "reverse_scan"]
