"""Advantage estimators for outcome rewards: the set users extend, looked up by `algo.advantage_estimator`.

An estimator maps one scalar reward per sample, in groups of `group_size` consecutive samples of the same
prompt, to one advantage per sample: fn(rewards (B*G,), group_size, algo) -> (B*G,). A name that is not
registered is tried as an import path "pkg.module:function".
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels import group_normalize, rloo_advantages
from rlkit.config import AlgoConfig, RecipeError

Estimator = Callable[[torch.Tensor, int, AlgoConfig], torch.Tensor]


def grpo_advantages(rewards: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """GRPO: (r - group mean) / group std; Dr.GRPO (algo.scale_rewards=false) keeps only the centring."""
    return group_normalize(rewards, group_size, scale=algo.scale_rewards)


def rloo(rewards: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """RLOO: r minus the mean of the other samples of the same prompt."""
    return rloo_advantages(rewards, group_size)


def reinforce_pp_baseline(rewards: torch.Tensor, group_size: int, algo: AlgoConfig) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): centre within the group, then scale by the whole batch's std.

    >>> # centred [0.5, -0.5, 0, 0]; batch std sqrt(0.125) = 0.3536
    >>> [round(a, 3) for a in reinforce_pp_baseline(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, AlgoConfig()).tolist()]
    [1.414, -1.414, 0.0, 0.0]
    """
    centred = group_normalize(rewards, group_size, scale=False)
    return centred / (centred.std(unbiased=False) + 1e-6) if centred.abs().sum() > 0 else centred


_ESTIMATORS: dict[str, Estimator] = {"grpo": grpo_advantages, "rloo": rloo, "reinforce_pp": reinforce_pp_baseline}


def register_estimator(name: str, fn: Estimator) -> None:
    _ESTIMATORS[name] = fn


def get_estimator(name: str) -> Estimator:
    if name in _ESTIMATORS:
        return _ESTIMATORS[name]
    if ":" in name:
        from rewards.registry import load_class  # the same import-path loader rewards use

        return load_class(name, "algo.advantage_estimator")
    raise RecipeError(
        f"algo.advantage_estimator: '{name}' is not one of {', '.join(sorted(_ESTIMATORS))} "
        "and not an import path 'pkg.module:function'"
    )


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 up to max_len - buffer, then a linear ramp to -penalty
    at max_len. lengths (B,) -> (B,).

    >>> overlong_penalty(torch.tensor([4, 6, 7, 8]), max_len=8, buffer=4, penalty=1.0).tolist()
    [-0.0, -0.5, -0.75, -1.0]
    """
    over = (lengths.float() - (max_len - buffer)).clamp(min=0.0)
    return -penalty * (over / buffer).clamp(max=1.0)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B*G,) True for samples whose group has the same reward everywhere (no learning signal).

    >>> uniform_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2).tolist()
    [True, True, False, False]
    """
    grouped = rewards.reshape(-1, group_size)
    same = (grouped == grouped[:, :1]).all(-1)  # (B,)
    return same.repeat_interleave(group_size)
