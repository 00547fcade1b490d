"""Losses and KL estimators: small pure functions (torch only), and the losses the trainer runs as objects.

Each named switch of the recipe has one registry here (rlkit.recipe.names.Registry): POLICY_LOSSES (algo.pg_loss),
KL_ESTIMATORS (ref.kl_estimator), DPO_LOSSES (algo.dpo_loss) and LOSS_AGGREGATIONS (algo.loss_agg). Built-ins register
by name beside their code; a recipe may name its own function by "pkg.module:name" instead.

A loss object holds its settings (built once from the recipe, `from_config`) and has one signature:
`loss(out, batch) -> (scalar, stats)` on one micro-batch, `out` being the model's forward of its rows (`Forward`
for the policy, values for the critic). Its stats are a typed frozen dataclass (torchtune's `PPOStats` style) whose
fields are sums over the micro-batch, so micro-batches' and ranks' stats add up to the step's (`+`), and whose
`metrics()` gives the step's logged values. The trainer runs `step(loss, batch)` (rlkit.training.rank.RankWorker).

Normalisation is explicit: per-token losses are *summed* and divided by a normaliser computed over the whole
step batch (all ranks, all micro-batches) by the caller. Summing the micro-batch gradients then gives exactly
the full-batch gradient, whatever the micro-batch size, gradient accumulation or number of ranks.

Shapes: B sequences, T target positions; `mask` is 1.0 on positions that count (response tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from rlkit.recipe import AlgoConfig, RefConfig
from rlkit.recipe import names
from rlkit.recipe.names import Registry
from rlkit.training.batches import PairBatch, PolicyBatch, SFTBatch, ValueBatch


# ref.kl_estimator: name -> f(logprobs, ref_logprobs) -> (B, T) per-token estimate of KL(pi || ref)
KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("ref.kl_estimator",
                                                                                        names.KL_ESTIMATORS)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence", 2020).

    With log-ratio r = ref - logp: k1 = -r, k2 = r^2 / 2, k3 = exp(r) - 1 - r (unbiased and >= 0).
    """
    return KL_ESTIMATORS.get(kind)(logprobs, ref_logprobs)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return -(ref_logprobs - logprobs)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (ref_logprobs - logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_ratio = ref_logprobs - logprobs  # (B, T)
    # Clamp guards exp overflow when the policy has drifted far; the value is then huge anyway.
    return torch.exp(log_ratio.clamp(max=20.0)) - 1.0 - log_ratio


@dataclass(frozen=True)
class LossAggregation:
    """How a (B, T) per-token loss becomes the step's scalar: `normalizer(mask, max_tokens)` over the whole step
    batch, and `aggregate(loss, mask, normalizer)` on each micro-batch (sums, so micro-batches add up)."""

    normalizer: Callable[[torch.Tensor, int], torch.Tensor]
    aggregate: Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | float"], torch.Tensor]


def _sum_tokens(loss: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    return (loss * mask).sum() / normalizer


def _mean_tokens_per_sequence(loss: torch.Tensor, mask: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    return per_seq.sum() / normalizer


def _generation_budget(mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    if max_tokens < 1:
        raise ValueError(f"loss aggregation 'seq-mean-token-sum-norm' needs the generation budget max_tokens >= 1, "
                         f"got {max_tokens}")
    return torch.tensor(float(mask.shape[0] * max_tokens), device=mask.device)


# algo.loss_agg: name -> LossAggregation. token-mean (DAPO) divides by the step batch's tokens; seq-mean-token-mean
# (GRPO) averages each sequence over its own tokens, then over the sequences; seq-mean-token-sum-norm (Dr.GRPO, Liu
# et al. 2025, "Understanding R1-Zero-Like Training") sums every token and divides by sequences x the generation
# budget, a constant that removes the per-sequence length normalisation (TRL's `dr_grpo`: B x max_completion_length)
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("algo.loss_agg", names.LOSS_AGGREGATIONS)
LOSS_AGGREGATIONS.register("token-mean")(LossAggregation(lambda mask, max_tokens: mask.sum().clamp(min=1.0),
                                                         _sum_tokens))
LOSS_AGGREGATIONS.register("seq-mean-token-mean")(LossAggregation(
    lambda mask, max_tokens: torch.tensor(float(mask.shape[0]), device=mask.device), _mean_tokens_per_sequence))
LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")(LossAggregation(_generation_budget, _sum_tokens))


def token_normalizer(mask: torch.Tensor, mode: str, max_tokens: int = 0) -> torch.Tensor:
    """The divisor for `aggregate` over the whole step batch (B, T) `mask`: its tokens (token-mean), its sequences
    (seq-mean-token-mean), or sequences x `max_tokens`, the generation budget (seq-mean-token-sum-norm)."""
    return LOSS_AGGREGATIONS.get(mode).normalizer(mask, max_tokens)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: torch.Tensor | float) -> torch.Tensor:
    """Sum a (B, T) per-token loss under `mask` and divide by the global `normalizer` (`token_normalizer`).

    seq-mean-token-mean first averages each sequence over its own tokens, so long and short answers weigh the same;
    token-mean and seq-mean-token-sum-norm sum every token, and differ only in the normaliser.
    """
    return LOSS_AGGREGATIONS.get(mode).aggregate(loss, mask, normalizer)


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


# algo.pg_loss: name -> f(logprobs, old_logprobs, advantages, mask, epsilon, epsilon_high) -> (per-token loss (B, T),
# per-token clipped indicator (B, T)); PolicyLoss adds the importance weight, KL and entropy terms around it
POLICY_LOSSES: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("algo.pg_loss",
                                                                                     names.POLICY_LOSSES)
POLICY_LOSSES.register("clip")(policy_loss)


@POLICY_LOSSES.register("cispo")
def cispo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      epsilon: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO with its weight capped at 1 + epsilon_high (`cispo_loss`)."""
    return cispo_loss(logprobs, old_logprobs, advantages, mask, 1.0 + epsilon_high)


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
    return DPO_LOSSES.get(kind)(h, beta), beta * h


# algo.dpo_loss: name -> f(h, beta) -> (B,) per-pair loss of the log-ratio margin h (`dpo_loss`)
DPO_LOSSES: Registry[Callable[[torch.Tensor, float], torch.Tensor]] = Registry("algo.dpo_loss", names.DPO_LOSSES)


@DPO_LOSSES.register("sigmoid")
def dpo_sigmoid(h: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * h)


@DPO_LOSSES.register("ipo")
def dpo_ipo(h: torch.Tensor, beta: float) -> torch.Tensor:
    return (h - 1.0 / (2.0 * beta)) ** 2


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


# -- losses as objects --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Forward:
    """The policy's forward of one micro-batch (rlkit.training.trainer.LogprobModel)."""

    logprobs: torch.Tensor  # (b, T) per-token log-probs of the targets, zero off the response
    entropy: torch.Tensor | None  # (b, T) when the loss asks for it (`needs_entropy`)


def _add(a, b):
    return None if a is None or b is None else a + b


@dataclass(frozen=True)
class Stats:
    """A loss's statistics of some rows: sums (a loss already divided by the step batch's normaliser, token counts,
    per-token quantities summed over tokens), so those of two disjoint parts of a step add up with `+`."""

    def __add__(self, other: "Stats") -> "Stats":
        return type(self)(**{f.name: _add(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def metrics(self) -> dict[str, float]:
        """The step's values as logged (its fields unless a subclass says otherwise)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SFTStats(Stats):
    loss: float


@dataclass(frozen=True)
class DPOStats(Stats):  # each divided by the step batch's pairs
    loss: float
    reward_margin: float  # beta * h, the implicit reward's margin (dpo_loss)
    pair_accuracy: float  # pairs whose margin is > 0
    chosen_nll: float  # the chosen response's NLL per token


@dataclass(frozen=True)
class PolicyStats(Stats):
    loss: float
    tokens: float  # response tokens that count (the per-token means' divisor)
    entropy: float  # summed over those tokens, as the four below
    clipped: float  # tokens the clip (or CISPO's cap) acted on
    approx_kl: float  # KL(old || new) = (r - 1) - log r: how far the update moved from the sampling policy
    rollout_kl: float  # KL(engine || trainer) on the engine's samples (k3): how far the two implementations disagree
    kl: Optional[float] = None  # KL to the reference (None: no reference model)

    def mean(self, total: float) -> float:
        return total / max(self.tokens, 1.0)

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.loss, "entropy": self.mean(self.entropy), "clip_fraction": self.mean(self.clipped),
               "approx_kl": self.mean(self.approx_kl), "rollout_kl": self.mean(self.rollout_kl)}
        return out | ({} if self.kl is None else {"kl": self.mean(self.kl)})


@dataclass(frozen=True)
class ValueStats(Stats):
    value_loss: float
    value_clip_fraction: float  # tokens whose clipped error was the larger, over the step batch's tokens


@dataclass(frozen=True)
class SFTLoss:
    """Next-token NLL of the response tokens over the step batch's response tokens (`SFTBatch.normalizer`)."""

    temperature: ClassVar[float] = 1.0
    needs_entropy: ClassVar[bool] = False

    def __call__(self, out: Forward, batch: "SFTBatch") -> tuple[torch.Tensor, SFTStats]:
        loss = sft_loss(out.logprobs, batch.tokens.response_mask, batch.normalizer)
        return loss, SFTStats(float(loss.detach()))


@dataclass(frozen=True)
class DPOLoss:
    """DPO or IPO over pairs (`dpo_loss`), plus `nll_coef` x the chosen response's NLL per token (RPO), which keeps
    its likelihood from sinking with the rejected one's; summed and divided by the step batch's pairs."""

    beta: float
    kind: str = "sigmoid"
    length_normalized: bool = False
    nll_coef: float = 0.0
    temperature: ClassVar[float] = 1.0
    needs_entropy: ClassVar[bool] = False

    @classmethod
    def from_config(cls, algo: "AlgoConfig") -> "DPOLoss":
        return cls(algo.dpo_beta, algo.dpo_loss, algo.dpo_length_normalized, algo.dpo_nll_coef)

    def __call__(self, out: Forward, batch: "PairBatch") -> tuple[torch.Tensor, DPOStats]:
        seq = out.logprobs.sum(-1)  # (b,) rows alternate chosen, rejected
        r, lengths = batch.ref_logps, batch.tokens.response_mask.sum(-1)  # (b,), (b,)
        per_token = (lengths[0::2], lengths[1::2]) if self.length_normalized else None
        losses, margins = dpo_loss(seq[0::2], seq[1::2], r[0::2], r[1::2], self.beta, self.kind, per_token)
        chosen_nll = -seq[0::2] / lengths[0::2].clamp(min=1.0)  # (b/2,)
        loss = (losses + self.nll_coef * chosen_nll).sum() / batch.num_pairs
        margins, chosen_nll = margins.detach(), chosen_nll.detach()
        return loss, DPOStats(float(loss.detach()), float(margins.sum()) / batch.num_pairs,
                              float((margins > 0).sum()) / batch.num_pairs, float(chosen_nll.sum()) / batch.num_pairs)


@dataclass(frozen=True)
class PolicyLoss:
    """GRPO/PPO's objective per token: the clipped surrogate (`policy_loss`; GSPO's sequence ratio with
    `ratio_level: sequence`) or CISPO, times the truncated importance weight min(p_old / p_engine, tis_cap) when
    tis_cap > 0, plus kl_coef x the KL to the reference, minus entropy_coef x the entropy, aggregated by `loss_agg`
    over the step batch's normaliser (`PolicyBatch.normalizer`).

    Without the batch's old log-probs (one on-policy pass) the old policy is this very forward, detached: the ratio
    is 1 and its gradient the policy gradient, without a separate no-grad forward."""

    epsilon: float = 0.2
    epsilon_high: float = 0.2
    kind: str = "clip"  # a name of POLICY_LOSSES (clip, cispo) or "pkg.module:function"
    ratio_level: str = "token"  # or "sequence" (GSPO)
    tis_cap: float = 0.0
    kl_coef: float = 0.0  # 0 when the KL goes into the reward (ref.kl_in: reward); it is still logged
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    temperature: float = 1.0  # the sampling temperature the log-probs are taken at
    needs_entropy: ClassVar[bool] = True  # always logged

    @classmethod
    def from_config(cls, algo: "AlgoConfig", ref: "RefConfig", temperature: float) -> "PolicyLoss":
        return cls(algo.epsilon, algo.epsilon_high, algo.pg_loss, algo.ratio_level, algo.tis_cap,
                   ref.kl_coef if ref.kl_in == "loss" else 0.0, ref.kl_estimator, algo.entropy_coef, algo.loss_agg,
                   temperature)

    def __call__(self, out: Forward, batch: "PolicyBatch") -> tuple[torch.Tensor, PolicyStats]:
        logprobs, mask = out.logprobs, batch.mask  # (b, T)
        old_logprobs = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
        new, old = logprobs, old_logprobs
        if self.ratio_level == "sequence":  # one clipped ratio per sequence, shared by its tokens
            new = sequence_log_ratio(logprobs, old_logprobs, mask)[:, None].expand_as(logprobs)
            old = torch.zeros_like(new)
        pg, clipped = POLICY_LOSSES.get(self.kind)(new, old, batch.advantages, mask, self.epsilon, self.epsilon_high)
        if self.tis_cap > 0:  # the engine, not the trainer, sampled the tokens (and up to max_staleness ago)
            pg = pg * torch.exp(old_logprobs - batch.rollout_logprobs).clamp(max=self.tis_cap)
        per_token, kl_sum = pg, None
        if batch.ref_logprobs is not None:
            kl = kl_estimate(logprobs, batch.ref_logprobs, self.kl_estimator)
            per_token, kl_sum = per_token + self.kl_coef * kl, float((kl.detach() * mask).sum())
        if self.entropy_coef:  # an entropy bonus keeps the policy from collapsing early (TRL's entropy_coef)
            per_token = per_token - self.entropy_coef * out.entropy
        loss = aggregate(per_token, mask, self.loss_agg, batch.normalizer)
        log_ratio = (logprobs - old_logprobs).detach()  # (b, T)
        return loss, PolicyStats(
            float(loss.detach()), float(mask.sum()), float((out.entropy.detach() * mask).sum()), float(clipped.sum()),
            float((((log_ratio.exp() - 1.0) - log_ratio) * mask).sum()),
            float((kl_estimate(batch.rollout_logprobs, old_logprobs, "k3") * mask).sum()), kl_sum)


@dataclass(frozen=True)
class ValueLoss:
    """PPO's clipped value loss (`value_loss`) over the step batch's response tokens (`ValueBatch.normalizer`);
    `out` is the critic's (b, T) values."""

    clip: float = 0.2

    def __call__(self, out: torch.Tensor, batch: "ValueBatch") -> tuple[torch.Tensor, ValueStats]:
        loss, clipped = value_loss(out, batch.old_values, batch.returns, batch.mask, self.clip, batch.normalizer)
        return loss, ValueStats(float(loss.detach()), float(clipped.sum()) / batch.normalizer)


def resolve_switches(algo: AlgoConfig, ref: RefConfig) -> None:
    """Each loss switch's implementation, imported now: a recipe's import path that cannot load fails before the run
    writes anything (the recipe check only saw its form)."""
    POLICY_LOSSES.get(algo.pg_loss)
    KL_ESTIMATORS.get(ref.kl_estimator)
    DPO_LOSSES.get(algo.dpo_loss)
    LOSS_AGGREGATIONS.get(algo.loss_agg)
