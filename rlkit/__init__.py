"""rlkit: RL post-training of language models, SFT -> DPO -> GRPO/PPO in one typed recipe.

Layers, bottom to top; a package imports only the ones below it (tests/test_imports.py holds this):

- leaves, which import no other part of rlkit: `rlkit.kernels` (fused log-probs, advantage scans, precision probes),
  `rlkit.rollout` (vLLM engines; uses rlkit.kernels.precision), `rlkit.rewards` (rewards and their scorer; uses
  rlkit.rollout), `rlkit.envs` (multi-turn environments; uses rlkit.rewards' sandbox). Their code lives in the
  repository's top-level folders rewards/, rollout/, kernels/ and envs/ (pyproject.toml maps them under `rlkit.`).
- `rlkit.recipe`: the schema, loading, checks, stage kinds and switch names of a recipe (no torch).
- `rlkit.data`: reading datasets, rendering chats, synthetic tasks, preparing a run's token ids.
- `rlkit.training`: batches, losses, trainer ranks, critic, reference model, packing, attention, LoRA, models.
- `rlkit.runtime`: the workers in-process or on Ray (the one module that imports Ray), resume points, tracking.
- `rlkit.algorithms`: one module per stage kind's `train(ctx)`, experience, episodes, advantages, evaluation.
- `rlkit.orchestration`: the runner, which runs a recipe's stages.
- the command-line tools, this package's top-level modules: `python -m rlkit.run | score | select | models | report`.
"""
