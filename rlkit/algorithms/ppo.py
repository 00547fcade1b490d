"""PPO with a learned critic and GAE (Schulman et al. 2017; Ouyang et al. 2022 for the LM setting).

Per-token rewards: the verifier's score on the last response token, and (with `ref.kl_in: reward`, the usual
PPO choice) a per-token KL penalty -kl_coef * k(old, ref). Advantages come from GAE over the critic's values
(`algo.gamma`, `algo.gae_lambda`) and are whitened over the batch's response tokens. One sample per prompt;
the critic starts from the policy checkpoint's transformer body with a zero value head.

Each batch trains in `algo.ppo_epochs` passes of `algo.ppo_minibatches` shuffled minibatches (policy and critic
step together on the same rows), stopping early once a minibatch's approx_kl passes `algo.target_kl`; logged as
cleanrl's ppo.py does: approx_kl, clip_fraction, value/explained_variance. The rest of the step (experience,
update, sync, asynchronous sampling) is GRPO's: rlkit.algorithms.onpolicy.
"""

from __future__ import annotations

import torch

import time

from rlkit.kernels import gae
from rlkit.recipe import stage_updates
from rlkit.algorithms.common import StageContext, Timer
from rlkit.algorithms.onpolicy import policy_batch, sync_and_log, token_metrics, update_policy
from rlkit.training.batches import ValueBatch
from rlkit.data.tasks import BatchSampler
from rlkit.training.losses import ValueLoss, kl_estimate, token_normalizer


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the counted tokens: 1 is a perfect critic, 0 one no better than
    the mean, negative a worse one (cleanrl's ppo.py logs it). NaN when the returns do not vary.

    >>> mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    >>> explained_variance(torch.tensor([[1.0, 3.0, 0.0]]), torch.tensor([[2.0, 4.0, 9.0]]), mask)
    1.0
    >>> explained_variance(torch.tensor([[3.0, 3.0]]), torch.tensor([[2.0, 4.0]]), torch.ones(1, 2))
    0.0
    """
    kept = mask > 0
    v, r = values[kept].double(), returns[kept].double()
    var = r.var(unbiased=False)
    return float("nan") if var == 0 else float(1.0 - (r - v).var(unbiased=False) / var)


def train(ctx: StageContext) -> None:
    cfg, stage, algo = ctx.cfg, ctx.stage, ctx.cfg.algo
    temperature = cfg.rollout.temperature
    ref = ctx.workers.cluster.reference(ctx.model_path, ctx.workers.trainer)
    critic = ctx.workers.cluster.critic_group(ctx.model_path, ctx.lr, ctx.warmup_steps,
                                              stage_updates(ctx.cfg, ctx.index))
    value_loss = ValueLoss(algo.value_clip)
    sampler = BatchSampler(ctx.data.problems, stage.batch_size, ctx.seed())
    maker = ctx.experience_maker()

    def produce(step: int, version: int):  # PPO: one sample per prompt
        return maker.make_groups(sampler, 1, temperature, ctx.seed() + step, 1, version)

    with ctx.workers.releasing(ref, critic), ctx.experience_source(produce, sampler) as source:
        for step in ctx.loop.steps(sampler, {"critic": critic}, position=lambda: source.position):
            timer, started = Timer(), time.perf_counter()

            # generate and score
            exp = source.get(step)  # B prompts x 1 sample
            timer.seconds |= maker.take_seconds()
            ctx.log.completions(step, exp.table_samples(), exp.scored)
            scores, valid = exp.rewards, exp.scorable.float()  # (B,)
            tokens = exp.token_batch(ctx.data.renderer.pad_id)
            mask = tokens.response_mask * valid[:, None]  # (B, L-1)

            # reference, old log-probs and values
            with timer("reference"):
                old_logprobs = ctx.workers.trainer.logprobs(tokens, temperature)
                ref_logprobs = ref.logprobs(tokens, temperature)
                old_values = critic.values(tokens)  # (B, L-1)

            # advantages: GAE over per-token rewards (score at the end, KL penalty along the way)
            kl = kl_estimate(old_logprobs, ref_logprobs, cfg.ref.kl_estimator) * mask
            rewards = terminal_rewards(scores * valid, mask)
            if cfg.ref.kl_in == "reward":
                rewards = rewards - cfg.ref.kl_coef * kl
            advantages, returns = gae(rewards, old_values * mask, mask, algo.gamma, algo.gae_lambda)
            advantages = whiten(advantages, mask)
            batch = policy_batch(cfg, exp, tokens, mask, old_logprobs, ref_logprobs, advantages)
            values = ValueBatch(tokens, mask, old_values, returns, float(token_normalizer(mask, "token-mean")))

            def value_step(rows):  # the critic learns on the policy's minibatch rows
                if algo.ppo_minibatches == 1:
                    return critic.step(value_loss, values)
                return critic.step(value_loss, values, rows, float(token_normalizer(values.mask[rows], "token-mean")))

            # update policy and critic: ppo_epochs x ppo_minibatches optimizer steps
            with timer("train"):
                metrics = update_policy(ctx, batch, step, value_step)

            # sync, then log
            metrics |= token_metrics(tokens, timer.seconds["train"])
            metrics |= {"value/explained_variance": explained_variance(old_values, returns, mask)}
            sync_and_log(ctx, step, exp, source, metrics, timer, started,
                         {"reward": f"{float(scores.mean()):.3f}", "vloss": f"{metrics['value/value_loss']:.4f}"})
