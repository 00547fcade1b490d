"""GRPO (Shao et al. 2024, DeepSeekMath): group-normalised outcome advantages, a clipped ratio objective and a
KL term to a frozen reference.

Departures from the paper, each a recipe switch:
- `algo.advantage_estimator` swaps group normalisation for RLOO or REINFORCE++-baseline, `algo.ratio_level:
  sequence` is GSPO, `algo.drop_uniform_groups` (with `algo.resample_rounds`) and `algo.overlong_buffer` are DAPO's dynamic
  sampling and soft overlong penalty, and `algo.tis_cap` weights tokens by truncated importance ratios trainer/engine;
- the KL term uses the configured estimator (k3 by default, as the paper) and can move into the reward
  (`ref.kl_in: reward`, PPO-style) instead of the loss;
- `algo.scale_rewards: false` drops the std division and `algo.loss_agg: seq-mean-token-sum-norm` the per-sequence
  length normalisation: both together are Dr.GRPO (Liu et al. 2025); `algo.loss_agg: token-mean` is DAPO's
  token-level average, and `algo.epsilon_high > algo.epsilon` is DAPO's clip-higher;
- `algo.pg_loss: cispo` replaces the clipped surrogate with MiniMax-M1's clipped importance weight, and
  `algo.entropy_coef` adds an entropy bonus;
- samples `reward.on_error: exclude` drops take no part in their group's advantages (as TRL's NaN rewards):
  every estimator sees only the valid samples, and a group with fewer than two has no signal;
- the "old" log-probs are the trainer's recompute of the sampling policy, not the engine's, so the ratio is
  exactly 1 on the first epoch; the engine/trainer mismatch is logged as `rollout_kl`;
- `algo.ppo_minibatches` splits each batch into shuffled optimizer steps, with `algo.target_kl` stopping early;
- `rollout.max_staleness: N >= 1` samples the next batches while the trainer updates (asynchronous, off-policy by
  up to N updates): the ratio is then taken against the trainer's recompute before the update (the proximal
  policy) and `algo.tis_cap` weights tokens by min(p_proximal / p_engine, cap), AReaL's decoupled objective (Fu et
  al. 2025). Step, experience and shared update: rlkit.algorithms.experience, rlkit.algorithms.onpolicy.
"""

from __future__ import annotations

import time

from rlkit.algorithms.advantages import compute_advantages, get_estimator, overlong_penalty, uniform_groups
from rlkit.algorithms.common import StageContext, Timer
from rlkit.algorithms.onpolicy import needs_old_logprobs, policy_batch, sync_and_log, token_metrics, update_policy
from rlkit.data.tasks import BatchSampler
from rlkit.training.losses import kl_estimate


def train(ctx: StageContext) -> None:
    cfg, stage, algo = ctx.cfg, ctx.stage, ctx.cfg.algo
    group, temperature = algo.group_size, cfg.rollout.temperature
    estimator = get_estimator(algo.advantage_estimator)
    # ref.kl_coef 0 (DAPO, Dr.GRPO; TRL's default beta): no reference model is loaded and no KL computed
    ref = ctx.workers.cluster.reference(ctx.model_path, ctx.workers.trainer) if cfg.ref.kl_coef else None
    sampler = BatchSampler(ctx.data.problems, stage.batch_size, ctx.seed())
    maker = ctx.experience_maker()
    rounds = algo.resample_rounds if algo.drop_uniform_groups else 1

    def produce(step: int, version: int):  # `group` samples per prompt from the engines' current weights
        return maker.make_groups(sampler, group, temperature, ctx.seed() + step, rounds, version)

    with ctx.workers.releasing(ref), ctx.experience_source(produce, sampler) as source:
        for step in ctx.loop.steps(sampler, position=lambda: source.position):
            timer, started = Timer(), time.perf_counter()

            # generate and score (sampled ahead under rollout.max_staleness >= 1); samples the reward policy
            # excludes (reward.on_error) drop out of the loss and of their group's statistics
            exp = source.get(step)  # B prompts x G samples
            timer.seconds |= maker.take_seconds()
            ctx.log.completions(step, exp.table_samples(), exp.scored)
            rewards, scorable = exp.rewards, exp.scorable  # (B*G,)
            if algo.overlong_buffer:  # DAPO: discourage running into the length limit before it truncates
                rewards = rewards + overlong_penalty(exp.lengths, cfg.rollout.episode_tokens, algo.overlong_buffer,
                                                     algo.overlong_penalty)
            uniform = uniform_groups(rewards, group, scorable)  # (B*G,) groups with nothing to compare
            valid = scorable & ~uniform if algo.drop_uniform_groups else scorable  # DAPO dynamic sampling: filter
            tokens = exp.token_batch(ctx.data.renderer.pad_id)  # (B*G, L)
            mask = tokens.response_mask * valid[:, None].float()  # (B*G, L-1)

            # reference and old log-probs: the anchor of the KL term and the denominator of the ratio. A single
            # on-policy pass with the KL in the loss needs no separate "old" forward (the trainer uses its own).
            with timer("reference"):
                old_logprobs = ctx.workers.trainer.logprobs(tokens, temperature) if needs_old_logprobs(cfg) else None
                ref_logprobs = ref.logprobs(tokens, temperature) if ref else None  # (B*G, L-1)
            if cfg.ref.kl_in == "reward" and ref:
                kl_old = (kl_estimate(old_logprobs, ref_logprobs, cfg.ref.kl_estimator) * mask).sum(-1)  # (B*G,)
                rewards = rewards - cfg.ref.kl_coef * kl_old

            # advantages: reward relative to the other valid samples of the same prompt (algo.advantage_estimator)
            advantages = compute_advantages(estimator, rewards, valid, group, algo)  # (B*G,)
            batch = policy_batch(cfg, exp, tokens, mask, old_logprobs, ref_logprobs, advantages)

            # update: ppo_epochs passes over the batch in ppo_minibatches optimizer steps each
            with timer("train"):
                metrics = update_policy(ctx, batch, step)

            # sync, then log: the engines sample the next batch from the updated weights
            metrics |= token_metrics(tokens, timer.seconds["train"]) | {"uniform_group_rate": uniform.float().mean()}
            metrics |= {"sampling_rounds": exp.rounds} if algo.resample_rounds > 1 else {}
            kl = {"kl": f"{float(metrics['kl']):.4f}"} if "kl" in metrics else {}  # none without a reference
            sync_and_log(ctx, step, exp, source, metrics, timer, started,
                         {"reward": f"{float(rewards.mean()):.3f}", **kl})


