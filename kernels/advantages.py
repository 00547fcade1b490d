"""Advantage estimators as vectorised tensor ops: group normalisation (GRPO, Dr.GRPO), leave-one-out (RLOO),
discounted returns (REINFORCE++) and GAE (PPO).

The two time recurrences are one reverse linear scan y_t = x_t + c_t * y_{t+1}, computed in chunks of
`SCAN_CHUNK` positions: inside a chunk the scan is a (C x C) matrix of decay products applied at once, and only
the boundary value is carried from chunk to chunk, so there is no Python loop over individual time steps.
On CUDA, `impl="auto"` runs the scan as a Triton kernel instead (`rlkit.kernels._triton_scan`).

The group estimators take an optional `valid` mask: samples it leaves out (a reward that could not be computed)
take no part in their group's statistics, as TRL leaves unscorable (NaN) rewards out with nanmean/nanstd. The
token recurrences need none: their `mask` already zeroes whole sequences.
"""

from __future__ import annotations

import torch

from rlkit.kernels._dispatch import choose_impl

SCAN_CHUNK = 64
_LOG_ZERO = -1e4  # log of a zero decay: exp() of it is exactly 0 in float64, and sums stay finite


def group_normalize(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std when `scale`.

    rewards (B,) with groups of `group_size` consecutive samples -> (B,). The std is the population std
    (unbiased=False); `scale=False` is Dr.GRPO. `valid` (B,) bool leaves samples out of their group: the mean and
    std are over the group's valid samples, a left-out sample gets 0, and so does every sample of a group with
    fewer than two valid ones (nothing to compare).

    >>> [round(a, 4) for a in group_normalize(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist()]
    [1.0, -1.0, 0.0, 0.0]
    >>> # the third sample left out: [1, 1, 1] is a uniform group, not [1, 1, 0, 1]
    >>> group_normalize(torch.tensor([1.0, 1.0, 0.0, 1.0]), 4, valid=torch.tensor([True, True, False, True])).tolist()
    [0.0, 0.0, 0.0, 0.0]
    """
    grouped = _groups(rewards, group_size)  # (B/G, G)
    if valid is None or bool(valid.all()):
        # Nothing left out: the plain reductions, bit for bit what unmasked callers always got (torch.std's
        # rounding differs from the masked sum below in the last bit).
        centred = grouped - grouped.mean(-1, keepdim=True)
        std = grouped.std(-1, unbiased=False, keepdim=True)
    else:
        kept = _groups(valid, group_size).bool()  # (B/G, G)
        count = kept.sum(-1, keepdim=True).to(rewards.dtype)  # (B/G, 1) valid samples per group
        mean = torch.where(kept, grouped, 0.0).sum(-1, keepdim=True) / count.clamp(min=1.0)
        centred = torch.where(kept, grouped - mean, 0.0)  # a lone valid sample is its own mean: 0
        std = (centred.square().sum(-1, keepdim=True) / count.clamp(min=1.0)).sqrt()
    if scale:
        centred = centred / (std + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the other rewards of its group.

    `valid` (B,) bool leaves samples out: the baseline is the mean of the other *valid* samples (n - 1 of them,
    as TRL's RLOOTrainer divides), left-out samples and groups with fewer than two valid samples get 0.

    >>> rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), 3).tolist()
    [3.0, -1.5, -1.5]
    >>> rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, valid=torch.tensor([True, False, True])).tolist()
    [3.0, 0.0, -3.0]
    """
    if group_size < 2:
        raise ValueError("RLOO needs group_size >= 2")
    grouped = _groups(rewards, group_size)  # (B/G, G)
    kept = torch.ones_like(grouped, dtype=torch.bool) if valid is None else _groups(valid, group_size).bool()
    count = kept.sum(-1, keepdim=True).to(rewards.dtype)  # (B/G, 1) valid samples per group
    others = (torch.where(kept, grouped, 0.0).sum(-1, keepdim=True) - grouped) / (count - 1).clamp(min=1.0)
    return torch.where(kept & (count >= 2), grouped - others, 0.0).reshape(-1)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B/G, G), one row per group."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def reverse_scan(x: torch.Tensor, decay: torch.Tensor, chunk: int = SCAN_CHUNK, impl: str = "auto") -> torch.Tensor:
    """y_t = x_t + decay_t * y_{t+1} with y_T = 0, over the last dim. x, decay (B, T) -> (B, T); decay >= 0.

    >>> reverse_scan(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])).tolist()
    [[1.75, 1.5, 1.0]]
    """
    if x.dim() != 2 or decay.shape != x.shape:
        raise ValueError(f"reverse_scan wants x, decay of one (B, T) shape, got {tuple(x.shape)}, {tuple(decay.shape)}")
    if choose_impl("reverse_scan", impl, x) == "triton":
        from rlkit.kernels._triton_scan import triton_reverse_scan

        return triton_reverse_scan(x, decay)
    return _chunked_reverse_scan(x, decay, chunk)


def _chunked_reverse_scan(x: torch.Tensor, decay: torch.Tensor, chunk: int) -> torch.Tensor:
    b, t = x.shape
    out_dtype = x.dtype
    # float64 throughout: the in-chunk solve forms decay products as exp(difference of log-decay prefix sums)
    x64, log_c = x.double(), torch.log(decay.double()).clamp(min=_LOG_ZERO)
    y = torch.zeros_like(x64)
    carry = torch.zeros(b, dtype=torch.float64, device=x.device)  # y at the first position after the chunk
    for end in range(t, 0, -chunk):
        start = max(0, end - chunk)
        lc = log_c[:, start:end]  # (B, C)
        # s[:, i] = sum of log decays before position i within the chunk; prod_{k=i}^{j-1} c_k = exp(s_j - s_i)
        s = torch.cat([torch.zeros(b, 1, dtype=torch.float64, device=x.device), lc.cumsum(-1)], dim=-1)  # (B, C+1)
        diff = s[:, None, :-1] - s[:, :-1, None]  # (B, C, C): [i, j] = s_j - s_i
        upper = torch.ones(end - start, end - start, dtype=torch.bool, device=x.device).triu()
        weights = torch.where(upper, diff, torch.full_like(diff, float("-inf"))).exp()  # j >= i only
        to_carry = torch.exp(s[:, -1:] - s[:, :-1])  # (B, C): product of decays from i to the chunk's end
        y[:, start:end] = (weights @ x64[:, start:end, None])[..., 0] + to_carry * carry[:, None]
        carry = y[:, start]
    return y.to(out_dtype)


def _next(x: torch.Tensor) -> torch.Tensor:
    """x shifted one step left along time, zero at the end: x_{t+1}."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=-1)


def _check_bt(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(shape != first for shape in shapes.values()):
        raise ValueError(f"expected tensors of one (B, T) shape, got {shapes}")


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float, impl: str = "auto") -> torch.Tensor:
    """REINFORCE++ returns G_t = r_t + gamma * G_{t+1} within the mask. (B, T) -> (B, T), zero off the mask.

    The sum stops at the end of each run of mask = 1 (rewards outside the mask are dropped).
    """
    _check_bt(rewards=rewards, mask=mask)
    mask = mask.to(rewards.dtype)
    return reverse_scan(rewards * mask, gamma * _next(mask), impl=impl) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). (B, T) each -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; the value after the last
    counted token is 0 (the episode ends there). Returns = A + V.
    """
    _check_bt(rewards=rewards, values=values, mask=mask)
    mask = mask.to(rewards.dtype)
    values = values * mask
    next_mask = _next(mask)
    deltas = (rewards + gamma * _next(values) * next_mask - values) * mask
    advantages = reverse_scan(deltas, gamma * lam * next_mask, impl=impl) * mask
    return advantages, (advantages + values) * mask
