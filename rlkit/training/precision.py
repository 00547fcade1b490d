"""`auto` precision, decided once at the start of a run for the devices its workers use, and written into the
resolved recipe (the run folder's recipe.yaml) in place of `auto`.

`trainer.dtype`, `ref.dtype` and `rollout.dtype` take `auto` (the default): bfloat16 where the device computes it
natively, float32 elsewhere (rlkit.kernels.precision says which is which and why). An explicit bfloat16 or float16 on a
device that only emulates it still runs, with one warning naming the measured slowdown and the `auto` fix. Workers
built without a run (tests, tools) resolve `auto` the same way on their own device.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from rlkit.kernels.precision import HALF, auto_dtype, half_support, slowdown, times_slower
from rlkit.recipe import RecipeConfig

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str, str]] = set()


def recipe_devices(cfg: RecipeConfig) -> tuple[str, str]:
    """('cuda' or 'cpu') for the trainer side (policy, critic, reference) and for the engines: a Ray actor sees a GPU
    only when the recipe gives it one; local workers share this process's device."""
    local = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.cluster.backend != "ray":
        return local, local
    return ("cuda" if cfg.cluster.gpus_per_trainer > 0 else "cpu"), ("cuda" if cfg.cluster.gpus_per_engine > 0 else "cpu")


def resolve(requested: str, device: str, key: str = "", warn: bool = True) -> tuple[str, str]:
    """The concrete dtype for `requested` on `device` and the reason (empty for a dtype the recipe names). An
    explicit half dtype the device emulates warns once per key, naming the measured slowdown and the fix."""
    if device == "cuda" and not torch.cuda.is_available():  # a GPU worker on another node, not visible from here
        return ("bfloat16", "CUDA workers (no GPU visible to the driver): bfloat16 assumed") if requested == "auto" \
            else (requested, "")
    if requested == "auto":
        return auto_dtype(device)
    if warn and requested in HALF and not half_support(requested, device).native:
        warn_emulated(requested, device, key)
    return requested, ""


def warn_emulated(dtype: str, device: str, key: str) -> None:
    """One warning per (key, dtype, device) in this process: what the emulation costs and the fix."""
    if (key, dtype, device) in _WARNED:
        return
    _WARNED.add((key, dtype, device))
    support = half_support(dtype, device)
    cost = f"a {dtype} matmul measured {times_slower(slowdown(dtype))} here" if device == "cpu" else ""
    log.warning("%s=%s: %s; %s. It runs, slowly; set %s=auto for float32 on this machine", key or "dtype", dtype,
                support.reason, cost or "expect it to be slow", key or "the dtype")


def resolve_recipe(cfg: RecipeConfig) -> RecipeConfig:
    """`cfg` with every `auto` dtype replaced by its decision on the device that computes it, the choice logged once
    with its reason; explicit half dtypes a device emulates warn."""
    trainer_device, engine_device = recipe_devices(cfg)
    trainer, why_trainer = resolve(cfg.trainer.dtype, trainer_device, "trainer.dtype")
    ref, why_ref = resolve(cfg.ref.dtype, trainer_device, "ref.dtype")
    engine, why_engine = resolve(cfg.rollout.dtype, engine_device, "rollout.dtype")
    reasons = sorted({why for why in (why_trainer, why_ref, why_engine) if why})
    mixed = " (mixed precision over float32 weights)" if trainer == "bfloat16" else ""
    log.info("precision: trainer %s%s, reference %s, engines %s%s", trainer, mixed, ref, engine,
             f" ({'; '.join(reasons)})" if reasons else "")
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, dtype=trainer),
                               ref=dataclasses.replace(cfg.ref, dtype=ref),
                               rollout=dataclasses.replace(cfg.rollout, dtype=engine))


def torch_dtype(requested: str, device: torch.device | str) -> torch.dtype:
    """A worker's own resolution of its dtype field (`auto` included) on its device, as a torch dtype."""
    kind = torch.device(device).type
    return getattr(torch, resolve(requested, kind, warn=False)[0])
