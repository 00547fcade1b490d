"""The algorithms layer: one module per stage kind with its `train(ctx)` (sft, dpo, online_dpo, grpo, ppo, rft,
average), named by the kind's record in rlkit.recipe.stage_kinds.STAGE_KINDS and imported only when a stage of that
kind runs; what they share (common: StageContext; onpolicy: GRPO and PPO's update-sync-log tail), the experience
producer, multi-turn episodes, advantage estimators and held-out evaluation.

Imports: rlkit.recipe, rlkit.data, rlkit.training, rlkit.runtime and the leaves; never rlkit.orchestration or the
command-line tools.
"""
