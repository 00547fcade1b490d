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
  exactly 1 on the first epoch; the engine/trainer mismatch is logged as `rollout_kl`.
"""

from __future__ import annotations

import torch

from rlkit.advantages import compute_advantages, get_estimator, overlong_penalty, uniform_groups
from rlkit.algorithms.common import StageContext, Timer, generate_and_score
from rlkit.data import BatchSampler
from rlkit.losses import kl_estimate, token_normalizer
from rlkit.trainer import PolicyBatch, pack_sequences
from rewards.scorer import ScoreOutput


def rollout_logprob_tensor(completions, prompt_lengths: list[int], width: int) -> torch.Tensor:
    """Engine log-probs placed on the trainer's target grid (B, width), zero off the response."""
    out = torch.zeros(len(completions), width)
    for i, (c, n) in enumerate(zip(completions, prompt_lengths)):
        out[i, n - 1 : n - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return out


def train(ctx: StageContext) -> None:
    cfg, stage, algo, pad_id = ctx.cfg, ctx.stage, ctx.cfg.algo, ctx.data.renderer.pad_id
    group, temperature = algo.group_size, cfg.rollout.temperature
    estimator = get_estimator(algo.advantage_estimator)
    # ref.kl_coef 0 (DAPO, Dr.GRPO; TRL's default beta): no reference model is loaded and no KL computed
    ref = ctx.cluster.reference(ctx.model_path) if cfg.ref.kl_coef else None
    sampler = BatchSampler(ctx.data.problems, stage.batch_size, ctx.seed())
    for step in ctx.steps(sampler):
        timer = Timer()

        # generate and score: `group` samples per prompt from the current policy, one reward each;
        # samples the reward policy excludes (reward.on_error) drop out of the loss and of their group's statistics
        prompt_ids, completions, scored, rounds = sample_groups(ctx, sampler, step, timer)  # completions (B*G,)
        rewards = torch.tensor(scored.scores, dtype=torch.float32)  # (B*G,)
        scorable = torch.tensor(scored.valid, dtype=torch.bool)  # (B*G,) the scorer's verdict
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        if algo.overlong_buffer:  # DAPO: discourage running into the length limit before it truncates
            rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, algo.overlong_buffer,
                                                 algo.overlong_penalty)
        uniform = uniform_groups(rewards, group, scorable)  # (B*G,) groups with nothing to compare
        valid = scorable & ~uniform if algo.drop_uniform_groups else scorable  # DAPO dynamic sampling: filter

        repeated_prompts = [p for p in prompt_ids for _ in range(group)]
        tokens = pack_sequences(repeated_prompts, [list(c.token_ids) for c in completions], pad_id)
        mask = tokens.response_mask * valid[:, None].float()  # (B*G, L-1)

        # reference and old log-probs: the anchor of the KL term and the denominator of the ratio. A single
        # on-policy pass with the KL in the loss needs no separate "old" forward (the trainer uses its own).
        needs_old = algo.ppo_epochs > 1 or cfg.ref.kl_in == "reward"
        with timer("reference"):
            old_logprobs = ctx.trainer.logprobs(tokens, temperature) if needs_old else None  # (B*G, L-1)
            ref_logprobs = ref.logprobs(tokens, temperature) if ref else None  # (B*G, L-1)
        if cfg.ref.kl_in == "reward" and ref:
            kl_old = (kl_estimate(old_logprobs, ref_logprobs, cfg.ref.kl_estimator) * mask).sum(-1)  # (B*G,)
            rewards = rewards - cfg.ref.kl_coef * kl_old

        # advantages: reward relative to the other valid samples of the same prompt (algo.advantage_estimator)
        advantages = compute_advantages(estimator, rewards, valid, group, algo)  # (B*G,)
        rollout_lp = rollout_logprob_tensor(completions, [len(p) for p in repeated_prompts], mask.shape[1])
        batch = PolicyBatch(
            tokens, mask, old_logprobs, ref_logprobs, rollout_lp, advantages,
            normalizer=float(token_normalizer(mask, algo.loss_agg, cfg.rollout.max_new_tokens)),
            kl_coef=cfg.ref.kl_coef if cfg.ref.kl_in == "loss" else 0.0,
            temperature=temperature,
        )

        # update: ppo_epochs passes over the rollout batch
        with timer("train"):
            for _ in range(algo.ppo_epochs):
                metrics = ctx.trainer.policy_step(batch)

        # sync: the engines sample the next batch from the updated weights
        with timer("weight_sync"):
            sync = ctx.sync_policy()

        # log
        metrics = summarize(metrics) | rollout_metrics(completions, timer)
        metrics |= reward_metrics(rewards, scorable) | {"uniform_group_rate": uniform.float().mean()}
        metrics |= {f"reward/{k}": v for k, v in scored.stats.items()}
        metrics |= {"weight_sync/seconds": sync.seconds, "weight_sync/mb_per_s": sync.mb_per_s,
                    "weight_sync/megabytes": sync.megabytes}
        metrics |= {"sampling_rounds": rounds} if algo.resample_rounds > 1 else {}
        ctx.log_step(step, metrics, timer.metrics(ctx.prefix))
        kl = {"kl": f"{float(metrics['kl']):.4f}"} if "kl" in metrics else {}  # none without a reference
        ctx.show(reward=f"{float(rewards.mean()):.3f}", **kl)
    ctx.cluster.release(ref)


def sample_groups(ctx: StageContext, sampler: BatchSampler, step: int, timer: Timer):
    """A batch of prompt groups. With `algo.drop_uniform_groups` and `algo.resample_rounds: N > 1` (DAPO's
    dynamic sampling), up to N batches of prompts are drawn until batch_size groups whose rewards differ are
    found; short of that, the first batch's uniform groups fill the rest (and leave the loss as before).

    Returns (prompt_ids (B,), completions (B*G,) prompt-major, ScoreOutput of those, batches drawn).
    """
    algo, group = ctx.cfg.algo, ctx.cfg.algo.group_size
    rounds = []
    for r in range(algo.resample_rounds if algo.drop_uniform_groups else 1):
        problems = sampler.next()
        prompt_ids, completions, scored = generate_and_score(
            ctx, problems, group, ctx.cfg.rollout.temperature, ctx.seed() + step + 100_003 * r, timer,
            step if r == 0 else None)
        scores, scorable = torch.tensor(scored.scores), torch.tensor(scored.valid)  # (B*G,)
        uniform = uniform_groups(scores, group, scorable)[::group].tolist()  # (B,)
        rounds.append((prompt_ids, completions, scored, uniform))
        if sum(not u for *_, flags in rounds for u in flags) >= len(problems):
            break
    if len(rounds) == 1:
        return *rounds[0][:3], 1
    picked = pick_groups([flags for *_, flags in rounds], len(rounds[0][0]))
    rows = [(r, g * group + j) for r, g in picked for j in range(group)]  # (round, sample) of each kept sample
    scored = ScoreOutput(scores=[rounds[r][2].scores[i] for r, i in rows],
                         results=[rounds[r][2].results[i] for r, i in rows],
                         valid=[rounds[r][2].valid[i] for r, i in rows], stats=rounds[0][2].stats)
    return [rounds[r][0][g] for r, g in picked], [rounds[r][1][i] for r, i in rows], scored, len(rounds)


def pick_groups(uniform: list[list[bool]], batch: int) -> list[tuple[int, int]]:
    """(round, group) pairs forming a batch: groups with a signal in the order sampled, topped up with the first
    round's uniform groups when fewer than `batch` were found.

    >>> pick_groups([[True, False, True], [False, False, True]], 3)
    [(0, 1), (1, 0), (1, 1)]
    >>> pick_groups([[True, False], [True, True]], 2)
    [(0, 1), (0, 0)]
    """
    informative = [(r, g) for r, flags in enumerate(uniform) for g, same in enumerate(flags) if not same]
    filler = [(0, g) for g, same in enumerate(uniform[0]) if same]
    return (informative + filler)[:batch]


def summarize(step_metrics: dict[str, float]) -> dict[str, float]:
    """Per-token means from the trainer's summed metrics."""
    out = dict(step_metrics)
    tokens = max(out.pop("token_count"), 1.0)
    for name, key in (("kl", "kl"), ("entropy", "entropy"), ("clipped", "clip_fraction"), ("rollout_kl", "rollout_kl")):
        if f"{name}_sum" in out:  # no kl without a reference model
            out[key] = out.pop(f"{name}_sum") / tokens
    return out


def reward_metrics(rewards: torch.Tensor, scorable: torch.Tensor) -> dict[str, float]:
    """Mean and std of the rewards (B,) of the samples the rewards could score: an excluded sample's placeholder
    0 is no reward."""
    kept = rewards[scorable.bool()]
    return {"reward/mean": float(kept.mean()) if len(kept) else 0.0,
            "reward/std": float(kept.std()) if len(kept) > 1 else 0.0}


def rollout_metrics(completions, timer) -> dict[str, float]:
    """Lengths, truncation and throughput of one step."""
    lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
    seconds = sum(timer.seconds.values())
    return {
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "truncation_rate": sum(not c.finished for c in completions) / len(completions),
        "samples_per_s": len(completions) / seconds,
        "tokens_per_s": float(lengths.sum()) / seconds,
    }
