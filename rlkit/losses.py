"""Losses and KL estimators as small pure functions (torch only).

Normalisation is explicit: per-token losses are *summed* and divided by a normaliser computed over the whole
step batch (all ranks, all micro-batches) by the caller. Summing the micro-batch gradients then gives exactly
the full-batch gradient, whatever the micro-batch size, gradient accumulation or number of ranks.

Shapes: B sequences, T target positions; `mask` is 1.0 on positions that count (response tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence", 2020).

    With log-ratio r = ref - logp: k1 = -r, k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased and >= 0).
    """
    log_ratio = ref_logprobs - logprobs  # (B, T)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        # Clamp guards exp overflow when the policy has drifted far; the value is then huge anyway.
        return torch.exp(log_ratio.clamp(max=20.0)) - 1.0 - log_ratio
    raise ValueError(f"kl estimator '{kind}' is not one of k1, k2, k3")


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def token_normalizer(mask: torch.Tensor, mode: str, max_tokens: int = 0) -> torch.Tensor:
    """The divisor for `aggregate` over the whole step batch (B, T) `mask`: its tokens (token-mean, DAPO), its
    sequences (seq-mean-token-mean, GRPO), or sequences x `max_tokens`, the generation budget
    (seq-mean-token-sum-norm: Dr.GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", whose constant
    divisor removes the per-sequence length normalisation; TRL's `dr_grpo` divides by B x max_completion_length)."""
    if mode == "token-mean":
        return mask.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    if mode == "seq-mean-token-sum-norm":
        if max_tokens < 1:
            raise ValueError(f"loss aggregation '{mode}' needs the generation budget max_tokens >= 1, got {max_tokens}")
        return torch.tensor(float(mask.shape[0] * max_tokens), device=mask.device)
    raise ValueError(f"loss aggregation '{mode}' is not one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Sum a (B, T) per-token loss under `mask` and divide by the global `normalizer` (`token_normalizer`).

    seq-mean-token-mean first averages each sequence over its own tokens, so long and short answers weigh the same;
    token-mean and seq-mean-token-sum-norm sum every token, and differ only in the normaliser.
    """
    if mode == "seq-mean-token-mean":
        per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
        return per_seq.sum() / normalizer
    return (loss * mask).sum() / normalizer


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Negative log-likelihood of the response tokens only (prompt tokens are masked out)."""
    return aggregate(-logprobs, mask, "token-mean", normalizer)


def policy_loss(
    logprobs: torch.Tensor,  # (B, T) current policy
    old_logprobs: torch.Tensor,  # (B, T) policy that sampled (or the trainer's recompute of it)
    advantages: torch.Tensor,  # (B,) per sequence or (B, T) per token
    mask: torch.Tensor,  # (B, T)
    epsilon: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A).

    Returns (per-token loss (B, T), per-token clipped indicator (B, T)). eps_high > eps is DAPO's clip-higher.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = (clipped < unclipped).float() * mask
    return loss, was_clipped


def cispo_loss(
    logprobs: torch.Tensor,  # (B, T) current policy
    old_logprobs: torch.Tensor,  # (B, T)
    advantages: torch.Tensor,  # (B,) per sequence or (B, T) per token
    mask: torch.Tensor,  # (B, T)
    cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO (MiniMax-M1, 2025): -sg(min(ratio, cap)) * A * log pi per token. The importance weight is clipped and
    detached instead of the update, so a token past the cap still passes its gradient A * grad log pi, scaled by
    the capped weight (PPO's clip would drop it), and there is no lower bound.

    Returns (per-token loss (B, T), per-token indicator (B, T) of weights capped while A > 0, TRL's clip metric).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs).detach()
    loss = -ratio.clamp(max=cap) * advantages * logprobs
    return loss, ((ratio > cap) & (advantages > 0)).float() * mask


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio (Zheng et al. 2025): mean over response tokens of
    log pi - log pi_old. (B, T) -> (B,)."""
    return ((logprobs - old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def dpo_loss(
    chosen_logps: torch.Tensor,  # (B,) summed response log-probs under the policy
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,  # (B,) the same under the frozen reference
    ref_rejected_logps: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B,) chosen and rejected response tokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss, and the implicit reward margin.

    h = (chosen - ref_chosen) - (rejected - ref_rejected); sigmoid: -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2.
    With `lengths` each log-ratio is first divided by its response's token count: IPO as its authors' code and
    TRL compute it (so beta keeps one meaning across lengths), or length-normalised DPO (TRL's sigmoid_norm).
    """
    chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps  # (B,)
    if lengths is not None:
        chosen, rejected = chosen / lengths[0].clamp(min=1.0), rejected / lengths[1].clamp(min=1.0)
    h = chosen - rejected  # (B,)
    if kind == "sigmoid":
        loss = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo loss '{kind}' is not one of sigmoid, ipo")
    return loss, beta * h


def value_loss(
    values: torch.Tensor,  # (B, T) critic now
    old_values: torch.Tensor,  # (B, T) critic when the batch was sampled
    returns: torch.Tensor,  # (B, T) GAE targets
    mask: torch.Tensor,  # (B, T)
    clip: float,
    normalizer: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: 0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2), token-mean.

    Returns (loss, per-token clipped indicator (B, T)).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = aggregate(0.5 * torch.maximum(unclipped_err, clipped_err), mask, "token-mean", normalizer)
    return loss, (clipped_err > unclipped_err).float() * mask
