"""rlkit: RL post-training of language models, SFT -> DPO -> GRPO/PPO in one typed recipe."""
