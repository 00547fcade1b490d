"""GRPO (Shao et al. 2024, DeepSeekMath): group-normalised outcome advantages, a clipped ratio objective and a
KL term to a frozen reference.

Departures from the paper, each a recipe switch:
- the KL term uses the configured estimator (k3 by default, as the paper) and can move into the reward
  (`ref.kl_in: reward`, PPO-style) instead of the loss;
- `algo.scale_rewards: false` drops the std division (Dr.GRPO), `algo.loss_agg` picks token-level (DAPO) or
  per-sequence averaging, and `algo.epsilon_high > algo.epsilon` is DAPO's clip-higher;
- the "old" log-probs are the trainer's recompute of the sampling policy, not the engine's, so the ratio is
  exactly 1 on the first epoch; the engine/trainer mismatch is logged as `rollout_kl`.
"""

from __future__ import annotations

import torch

from kernels import group_normalize
from rlkit.algorithms.common import StageContext, Timer, encode_prompt, to_samples
from rlkit.data import BatchSampler
from rlkit.losses import aggregate, kl_estimate, policy_loss, token_normalizer
from rlkit.reference import ReferenceModel
from rlkit.trainer import Trainer, pack_sequences, sequence_logprobs


def rollout_logprob_tensor(completions, prompt_lengths: list[int], width: int) -> torch.Tensor:
    """Engine log-probs placed on the trainer's target grid (B, width), zero off the response."""
    out = torch.zeros(len(completions), width)
    for i, (c, n) in enumerate(zip(completions, prompt_lengths)):
        out[i, n - 1 : n - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return out


def train(ctx: StageContext) -> None:
    cfg, stage, algo, tok = ctx.cfg, ctx.stage, ctx.cfg.algo, ctx.tokenizer
    group, temperature, impl = algo.group_size, cfg.rollout.temperature, cfg.trainer.logprob_impl
    trainer = Trainer(ctx.model, cfg.trainer, ctx.lr, ctx.warmup_steps)
    ref = ReferenceModel(cfg.ref, ctx.model, cfg.trainer.micro_batch_size, impl)
    sampler = BatchSampler(ctx.train, stage.batch_size, ctx.seed())
    bar = ctx.logger.progress(stage.steps, f"{ctx.index}:{ctx.prefix}")
    for step in range(stage.steps):
        timer = Timer()
        problems = sampler.next()
        prompt_ids = [encode_prompt(tok, p.prompt) for p in problems]

        # generate: `group` samples per prompt from the current policy, with the engine's log-probs
        with timer("generate"):
            groups = ctx.engine.generate(prompt_ids, n=group, temperature=temperature, seed=ctx.seed() + step)
        completions = [c for g in groups for c in g]  # (B*G,) prompt-major

        # score: one scalar reward per completion; samples the reward policy excludes drop out of the loss
        with timer("score"):
            scored = ctx.scorer.score(to_samples(problems, [c.text for c in completions], group))
        rewards = torch.tensor(scored.scores, dtype=torch.float32)  # (B*G,)
        valid = torch.tensor(scored.valid, dtype=torch.float32)  # (B*G,)

        repeated_prompts = [p for p in prompt_ids for _ in range(group)]
        batch = pack_sequences(repeated_prompts, [list(c.token_ids) for c in completions], tok.pad_token_id)
        mask = batch.response_mask * valid[:, None]  # (B*G, L-1)

        # reference and old log-probs: the anchor of the KL term and the denominator of the ratio
        with timer("reference"):
            old_logprobs = trainer.logprobs(batch, temperature)  # (B*G, L-1)
            ref_logprobs = ref.logprobs(batch, temperature)
        kl_old = (kl_estimate(old_logprobs, ref_logprobs, cfg.ref.kl_estimator) * mask).sum(-1)  # (B*G,)
        if cfg.ref.kl_in == "reward":
            rewards = rewards - cfg.ref.kl_coef * kl_old

        # advantages: reward relative to the other samples of the same prompt
        advantages = group_normalize(rewards, group, scale=algo.scale_rewards) * valid  # (B*G,)
        normalizer = token_normalizer(mask, algo.loss_agg)
        kl_coef = cfg.ref.kl_coef if cfg.ref.kl_in == "loss" else 0.0

        def micro_loss(mb, rows):
            logprobs, entropy = sequence_logprobs(ctx.model, mb, temperature, impl, return_entropy=True)
            m = mask[rows]
            pg, clipped = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, algo.epsilon, algo.epsilon_high)
            kl = kl_estimate(logprobs, ref_logprobs[rows], cfg.ref.kl_estimator)
            loss = aggregate(pg + kl_coef * kl, m, algo.loss_agg, normalizer)
            tokens = mask.sum().clamp(min=1.0)
            return loss, {
                "loss": loss.detach(),
                "kl": (kl.detach() * m).sum() / tokens,
                "entropy": (entropy.detach() * m).sum() / tokens,
                "clip_fraction": clipped.sum() / tokens,
            }

        # update: ppo_epochs passes over the rollout batch
        with timer("train"):
            for _ in range(algo.ppo_epochs):
                metrics = trainer.step(micro_loss, batch)

        # sync: the engine samples the next batch from the updated weights
        with timer("weight_sync"):
            sync = ctx.engine.sync_weights(ctx.model.state_dict())

        # log
        ctx.logger.global_step += 1
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        rollout_lp = rollout_logprob_tensor(completions, [len(p) for p in repeated_prompts], mask.shape[1])
        n_tok = batch.response_mask.sum().clamp(min=1.0)
        metrics.update(
            {
                "reward/mean": rewards.mean(),
                "reward/std": rewards.std(),
                **{f"reward/{k}": v for k, v in scored.stats.items()},
                "response_length/mean": lengths.mean(),
                "response_length/max": lengths.max(),
                "truncation_rate": sum(not c.finished for c in completions) / len(completions),
                "rollout_kl": (kl_estimate(rollout_lp, old_logprobs, "k3") * batch.response_mask).sum() / n_tok,
                "weight_sync/seconds": sync.seconds,
                "weight_sync/mb_per_s": sync.mb_per_s,
                "samples_per_s": len(completions) / sum(timer.seconds.values()),
                "tokens_per_s": float(lengths.sum()) / sum(timer.seconds.values()),
            }
        )
        if step % cfg.logging.log_every == 0 or step == stage.steps - 1:
            ctx.logger.log({f"{ctx.prefix}/{k}": v for k, v in metrics.items()} | timer.metrics(ctx.prefix))
        bar.set_postfix(reward=f"{float(rewards.mean()):.3f}", kl=f"{float(metrics['kl']):.4f}")
        bar.update(1)
    bar.close()
