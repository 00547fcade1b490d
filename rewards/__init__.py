"""Rewards (a leaf, installed as rlkit.rewards): reward classes with `score(sample) -> RewardResult` (rlkit.rewards.base),
the built-ins and user classes by import path (rlkit.rewards.registry), and the scorer that runs them in killable
worker processes with a per-sample deadline (rlkit.rewards.scorer).

Imports: the standard library, and rlkit.rollout for the LLM judge's engine; never another part of rlkit (each
takes a config of its own, e.g. rlkit.rewards.scorer.ScorerConfig).
"""
