"""What GRPO and PPO share once they have their advantages: the policy batch, the update (shuffled minibatch
epochs with a `target_kl` early stop), the weight sync and the step's metrics. The two differ only in the advantage
(a group estimator against a critic with GAE).

Old log-probs are the trainer's log-probs with the weights before the update (a separate forward when the update
takes several optimizer steps; otherwise the update's own forward, detached). That is the proximal policy of AReaL's
decoupled objective: the ratio is taken against it, clipped as PPO's, and `algo.tis_cap` weights each token by
min(p_proximal / p_engine, cap), the engine's sampling weights being older by up to `rollout.max_staleness`
updates.
"""

from __future__ import annotations

import time

import torch

from rlkit.algorithms.episodes import episode_metrics
from rlkit.algorithms.experience import Experience, ExperienceSource
from rlkit.training.losses import PolicyLoss, token_normalizer
from rlkit.training.batches import PolicyBatch, TokenBatch


def needs_old_logprobs(cfg) -> bool:
    """Whether the ratio's denominator must be a separate forward: the update takes several optimizer steps, or the
    KL penalty goes into the reward. A single pass uses its own forward, detached: the weights before the update,
    which under rollout.max_staleness >= 1 are also the decoupled objective's proximal policy, so asynchronous
    sampling costs no extra forward."""
    algo = cfg.algo
    return algo.ppo_epochs > 1 or algo.ppo_minibatches > 1 or cfg.ref.kl_in == "reward"


def policy_batch(cfg, exp: Experience, tokens: TokenBatch, mask: torch.Tensor, old_logprobs, ref_logprobs,
                 advantages: torch.Tensor) -> PolicyBatch:
    """The update's batch: (B*G, L-1) tensors; the normaliser is over the whole step batch (losses.py)."""
    return PolicyBatch(
        tokens, mask, old_logprobs, ref_logprobs, exp.rollout_logprobs(mask.shape[1]), advantages,
        normalizer=float(token_normalizer(mask, cfg.algo.loss_agg, cfg.rollout.episode_tokens)),
    )


def minibatch_rows(rows: int, count: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """`count` minibatches of a shuffled permutation of `rows` (count 1: every row in order).

    >>> [r.tolist() for r in minibatch_rows(4, 1, None)]
    [[0, 1, 2, 3]]
    >>> sorted(sum((r.tolist() for r in minibatch_rows(6, 3, torch.Generator().manual_seed(0))), []))
    [0, 1, 2, 3, 4, 5]
    """
    if count == 1:
        return [torch.arange(rows)]
    return list(torch.randperm(rows, generator=generator).chunk(count))


def minibatch_normalizer(cfg, batch: PolicyBatch, rows: torch.Tensor) -> float:
    """The loss divisor of rows of the step batch as an optimizer step of their own: over these rows."""
    return float(token_normalizer(batch.mask[rows], cfg.algo.loss_agg, cfg.rollout.episode_tokens))


def update_policy(ctx, batch: PolicyBatch, step: int, value_step=None) -> dict[str, float]:
    """algo.ppo_epochs passes over the batch, each in algo.ppo_minibatches shuffled minibatches (one optimizer step
    each); stops early once a minibatch's approx_kl passes algo.target_kl (cleanrl's ppo.py). `value_step(rows)` also
    updates a critic on each minibatch's rows (PPO). Returns the mean of the minibatch steps' metrics."""
    cfg, algo = ctx.cfg, ctx.cfg.algo
    loss = PolicyLoss.from_config(algo, cfg.ref, cfg.rollout.temperature)
    generator = torch.Generator().manual_seed(ctx.seed() * 7_919 + step)
    steps: list[dict[str, float]] = []
    for _ in range(algo.ppo_epochs):
        for rows in minibatch_rows(len(batch), algo.ppo_minibatches, generator):
            # the step batch goes to the ranks once (on Ray, one object ref), each minibatch as its rows
            if algo.ppo_minibatches == 1:
                update = ctx.workers.trainer.step(loss, batch)
            else:
                update = ctx.workers.trainer.step(loss, batch, rows, minibatch_normalizer(cfg, batch, rows))
            metrics = update.metrics()
            if value_step is not None:
                metrics |= {f"value/{k}": v for k, v in value_step(rows).metrics().items()}
            steps.append(metrics)
            if algo.target_kl and update.stats.mean(update.stats.approx_kl) > algo.target_kl:
                return mean_metrics(steps) | {"update/minibatch_steps": len(steps), "update/early_stop": 1.0}
    return mean_metrics(steps) | ({"update/minibatch_steps": len(steps)} if len(steps) > 1 else {})


def mean_metrics(steps: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the update's optimizer steps (one step: its own values)."""
    if len(steps) == 1:
        return steps[0]
    return {k: sum(float(m[k]) for m in steps) / len(steps) for k in steps[0]}


def sync_and_log(ctx, step: int, exp: Experience, source: ExperienceSource, metrics: dict, timer,
                 started: float, show: dict[str, str]) -> None:
    """The engines take the updated weights (the next batch is sampled from them, or within max_staleness of them);
    then the step's metrics are logged."""
    with timer("weight_sync"):
        sync = ctx.workers.sync_policy()
    source.synced()
    seconds = time.perf_counter() - started
    metrics = metrics | rollout_metrics(exp, seconds) | reward_metrics(exp.rewards, exp.scorable)
    metrics |= {f"reward/{k}": v for k, v in exp.scored.stats.items()}
    metrics |= ctx.gold.step(exp.scored, exp.scored.valid, exp.group_size)  # proxy vs reward.gold (if any)
    metrics |= {"weight_sync/seconds": sync.seconds, "weight_sync/mb_per_s": sync.mb_per_s,
                "weight_sync/megabytes": sync.megabytes}
    if ctx.cfg.env.enabled:  # multi-turn: turns, tool calls and errors, time in tools
        metrics |= episode_metrics(exp.completions)
    if ctx.cfg.rollout.max_staleness:
        metrics |= {"async/staleness": float(step - exp.version), "async/wait_seconds": source.wait_seconds}
    ctx.log.step(step, metrics, timer.metrics(ctx.prefix))
    ctx.log.show(**show)


def token_metrics(tokens: TokenBatch, train_seconds: float) -> dict[str, float]:
    """Share of the padded (B, L) grid that is padding, and real tokens per second of update."""
    real = float(tokens.attention_mask.sum())
    return {"tokens/padding_fraction": 1.0 - real / max(tokens.attention_mask.numel(), 1),
            "perf/update_tokens_per_s": real / max(train_seconds, 1e-9)}


def reward_metrics(rewards: torch.Tensor, scorable: torch.Tensor) -> dict[str, float]:
    """Mean and std of the rewards (B,) of the samples the rewards could score: an excluded sample's placeholder
    0 is no reward."""
    kept = rewards[scorable.bool()]
    return {"reward/mean": float(kept.mean()) if len(kept) else 0.0,
            "reward/std": float(kept.std()) if len(kept) > 1 else 0.0}


def rollout_metrics(exp: Experience, seconds: float) -> dict[str, float]:
    """Lengths, truncation and throughput of one step (`seconds`: its wall-clock time)."""
    lengths = exp.lengths.float()
    finished = [c.finished for c in exp.completions]
    return {
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "truncation_rate": sum(not f for f in finished) / len(finished),
        "samples_per_s": len(finished) / seconds,
        "tokens_per_s": float(lengths.sum()) / seconds,
    }
