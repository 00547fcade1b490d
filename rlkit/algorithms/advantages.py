"""Advantage estimators for outcome rewards: the set users extend, looked up by `algo.advantage_estimator`.

An estimator maps one scalar reward per sample, in groups of `group_size` consecutive samples of the same
prompt, to one advantage per sample: fn(rewards (B*G,), valid (B*G,) bool, group_size, algo) -> (B*G,). A sample
whose `valid` is False (its reward could not be computed and `reward.on_error` is "exclude") must take no part
in its group's statistics: its reward is a placeholder 0. `compute_advantages` holds every estimator to that
contract: left-out samples, and every sample of a group with fewer than two valid ones, get advantage 0. A name
that is not registered is tried as an import path "pkg.module:function".
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from rlkit.kernels import group_normalize, rloo_advantages
from rlkit.recipe import AlgoConfig, RecipeError

Estimator = Callable[[torch.Tensor, torch.Tensor, int, AlgoConfig], torch.Tensor]


def grpo_advantages(rewards: torch.Tensor, valid: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """GRPO: (r - group mean) / group std over the group's valid samples; Dr.GRPO (algo.scale_rewards=false)
    keeps only the centring."""
    return group_normalize(rewards, group_size, scale=algo.scale_rewards, valid=valid)


def rloo(rewards: torch.Tensor, valid: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """RLOO: r minus the mean of the other valid samples of the same prompt."""
    return rloo_advantages(rewards, group_size, valid)


def reinforce_pp_baseline(
    rewards: torch.Tensor, valid: torch.Tensor, group_size: int, algo: AlgoConfig
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): centre within the group, then scale by the std of the centred
    values over the whole batch's valid samples (population std).

    >>> # centred [0.5, -0.5, 0, 0]; batch std sqrt(0.125) = 0.3536
    >>> ones = torch.ones(4, dtype=torch.bool)
    >>> [round(a, 3) for a in reinforce_pp_baseline(torch.tensor([1.0, 0.0, 1.0, 1.0]), ones, 2, AlgoConfig()).tolist()]
    [1.414, -1.414, 0.0, 0.0]
    """
    centred = group_normalize(rewards, group_size, scale=False, valid=valid)  # (B*G,)
    if centred.abs().sum() == 0:
        return centred
    return centred / (centred[valid.bool()].std(unbiased=False) + 1e-6)


_ESTIMATORS: dict[str, Estimator] = {"grpo": grpo_advantages, "rloo": rloo, "reinforce_pp": reinforce_pp_baseline}


def register_estimator(name: str, fn: Estimator) -> None:
    _ESTIMATORS[name] = _check_contract(fn, name)


def get_estimator(name: str) -> Estimator:
    if name in _ESTIMATORS:
        return _ESTIMATORS[name]
    if ":" in name:
        from rlkit.rewards.registry import load_class  # the same import-path loader rewards use

        return _check_contract(load_class(name, "algo.advantage_estimator"), name)
    raise RecipeError(
        f"algo.advantage_estimator: '{name}' is not one of {', '.join(sorted(_ESTIMATORS))} "
        "and not an import path 'pkg.module:function'"
    )


def _check_contract(fn: Estimator, name: str) -> Estimator:
    """Fail at load, not at the first step, on an estimator that does not take (rewards, valid, group_size, algo)."""
    try:
        inspect.signature(fn).bind(None, None, None, None)
    except TypeError as e:
        raise RecipeError(
            f"algo.advantage_estimator: '{name}' must be a function (rewards, valid, group_size, algo) -> advantages "
            f"({e}); `valid` marks the samples that may enter group statistics (see rlkit/advantages.py)"
        ) from e
    except ValueError:  # no signature to inspect (a builtin): the first call will tell
        pass
    return fn


def informative(valid: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B*G,) True for valid samples of groups with at least two valid samples: the ones that can carry a signal.

    >>> informative(torch.tensor([True, False, True, True]), 2).tolist()
    [False, False, True, True]
    """
    grouped = valid.bool().reshape(-1, group_size)  # (B, G)
    return (grouped & (grouped.sum(-1, keepdim=True) >= 2)).reshape(-1)


def compute_advantages(
    estimator: Estimator, rewards: torch.Tensor, valid: torch.Tensor, group_size: int, algo: AlgoConfig
) -> torch.Tensor:
    """The estimator's advantages (B*G,) under its contract: whatever it returns, a left-out sample and every
    sample of a group with fewer than two valid samples get 0 (TRL zeroes its NaN advantages the same way)."""
    advantages = estimator(rewards, valid.bool(), group_size, algo)
    if advantages.shape != rewards.shape:
        raise ValueError(f"advantage estimator returned shape {tuple(advantages.shape)} for rewards "
                         f"{tuple(rewards.shape)}; it must give one advantage per sample")
    return advantages * informative(valid, group_size).to(advantages.dtype)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to max_len - buffer, then a linear ramp to -penalty
    at max_len. lengths (B,) -> (B,).

    >>> overlong_penalty(torch.tensor([4, 6, 7, 8]), max_len=8, buffer=4, penalty=1.0).tolist()
    [-0.0, -0.5, -0.75, -1.0]
    """
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)


def uniform_groups(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B*G,) True for samples whose group has no learning signal: its valid samples' rewards are all equal (or it
    has fewer than two valid samples). `valid` (B*G,) bool, default all valid.

    >>> uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [True, True, False, False]
    >>> uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 4, torch.tensor([True, True, False, True])).tolist()
    [True, True, True, True]
    """
    grouped = rewards.reshape(-1, group_size)  # (B, G)
    kept = torch.ones_like(grouped, dtype=torch.bool) if valid is None else valid.bool().reshape(-1, group_size)
    high = grouped.masked_fill(~kept, float("-inf")).amax(-1)  # (B,) largest valid reward
    low = grouped.masked_fill(~kept, float("inf")).amin(-1)
    same = high <= low  # all valid rewards equal; also true with no valid reward (-inf <= inf)
    return same.repeat_interleave(group_size)
