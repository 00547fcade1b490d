"""PPO with a learned critic and GAE (Schulman et al. 2017; Ouyang et al. 2022 for the LM setting).

Per-token rewards: the verifier's score on the last response token, and (with `ref.kl_in: reward`, the usual
PPO choice) a per-token KL penalty -kl_coef * k(old, ref). Advantages come from GAE over the critic's values
(`algo.gamma`, `algo.gae_lambda`) and are whitened over the batch's response tokens. One sample per prompt;
the critic starts from the policy checkpoint's transformer body with a zero value head.
"""

from __future__ import annotations

import torch

from kernels import gae
from rlkit.algorithms.common import StageContext, Timer, generate_and_score
from rlkit.algorithms.grpo import reward_metrics, rollout_logprob_tensor, rollout_metrics, summarize
from rlkit.critic import ValueBatch
from rlkit.data import BatchSampler
from rlkit.losses import kl_estimate, token_normalizer
from rlkit.trainer import PolicyBatch, pack_sequences


def terminal_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) zeros with each row's score on its last counted token.

    >>> terminal_rewards(torch.tensor([1.0, -2.0]), torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])).tolist()
    [[0.0, 0.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0]]
    """
    positions = torch.arange(mask.shape[1])
    last = (positions * (mask > 0)).amax(-1)  # (B,) index of the last counted token
    out = torch.zeros(mask.shape)
    has_tokens = mask.sum(-1) > 0
    out[has_tokens, last[has_tokens]] = scores[has_tokens].float()
    return out


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the counted tokens (the rest stay zero). The variance is the population one,
    as rlkit's group std (TRL's old PPO `masked_whiten` corrected it by n / (n - 1); docs/algorithms.md).

    >>> whiten(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]])).tolist()  # mean 2, variance 1
    [[-1.0, 1.0, 0.0]]
    """
    n = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def train(ctx: StageContext) -> None:
    cfg, stage, algo, pad_id = ctx.cfg, ctx.stage, ctx.cfg.algo, ctx.data.renderer.pad_id
    n, temperature = 1, cfg.rollout.temperature  # PPO: one sample per prompt
    ref = ctx.cluster.reference(ctx.model_path)
    critic = ctx.cluster.critic_group(ctx.model_path, ctx.lr, ctx.warmup_steps)
    sampler = BatchSampler(ctx.data.problems, stage.batch_size, ctx.seed())
    for step in ctx.steps(sampler, {"critic": critic}):
        timer = Timer()
        problems = sampler.next()

        # generate and score
        prompt_ids, completions, scored = generate_and_score(ctx, problems, n, temperature, ctx.seed() + step, timer,
                                                             step)
        scores = torch.tensor(scored.scores, dtype=torch.float32)  # (B,)
        valid = torch.tensor(scored.valid, dtype=torch.float32)
        tokens = pack_sequences(prompt_ids, [list(c.token_ids) for c in completions], pad_id)
        mask = tokens.response_mask * valid[:, None]  # (B, L-1)

        # reference, old log-probs and values
        with timer("reference"):
            old_logprobs = ctx.trainer.logprobs(tokens, temperature)
            ref_logprobs = ref.logprobs(tokens, temperature)
            old_values = critic.values(tokens)  # (B, L-1)

        # advantages: GAE over per-token rewards (score at the end, KL penalty along the way)
        kl = kl_estimate(old_logprobs, ref_logprobs, cfg.ref.kl_estimator) * mask
        rewards = terminal_rewards(scores * valid, mask)
        if cfg.ref.kl_in == "reward":
            rewards = rewards - cfg.ref.kl_coef * kl
        advantages, returns = gae(rewards, old_values * mask, mask, algo.gamma, algo.gae_lambda)
        advantages = whiten(advantages, mask)
        normalizer = float(token_normalizer(mask, "token-mean"))
        rollout_lp = rollout_logprob_tensor(completions, [len(p) for p in prompt_ids], mask.shape[1])
        batch = PolicyBatch(
            tokens, mask, old_logprobs, ref_logprobs, rollout_lp, advantages,
            float(token_normalizer(mask, algo.loss_agg, cfg.rollout.max_new_tokens)),
            kl_coef=cfg.ref.kl_coef if cfg.ref.kl_in == "loss" else 0.0, temperature=temperature,
        )

        # update policy and critic
        with timer("train"):
            for _ in range(algo.ppo_epochs):
                metrics = ctx.trainer.policy_step(batch)
                value_metrics = critic.value_step(ValueBatch(tokens, mask, old_values, returns, normalizer))

        # sync
        with timer("weight_sync"):
            sync = ctx.sync_policy()

        # log
        metrics = summarize(metrics) | rollout_metrics(completions, timer)
        metrics |= {f"value/{k}": v for k, v in value_metrics.items()}
        metrics |= reward_metrics(scores, valid) | {f"reward/{k}": v for k, v in scored.stats.items()}
        metrics |= {"weight_sync/seconds": sync.seconds, "weight_sync/mb_per_s": sync.mb_per_s,
                    "weight_sync/megabytes": sync.megabytes}
        ctx.log_step(step, metrics, timer.metrics(ctx.prefix))
        ctx.show(reward=f"{float(scores.mean()):.3f}", vloss=f"{value_metrics['value_loss']:.4f}")
    ctx.cluster.release(ref, critic)
