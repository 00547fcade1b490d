"""`auto` dtypes resolved once per run for the workers' devices (forced capability, each way), written into the
resolved recipe; an explicit half dtype on an emulating CPU warns once with the measured factor and the fix."""

import dataclasses
import logging

import pytest
import torch

from rlkit.kernels import precision
from rlkit.training import precision as run_precision
from rlkit.recipe import ClusterConfig, RecipeConfig, RefConfig, RolloutConfig, StageConfig, TrainerConfig
from rlkit.training.reference import ReferenceModel
from rlkit.training.trainer import ShardedTrainer

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}
AMX = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": True}


@pytest.fixture
def cpu_kind(monkeypatch):
    """Force the CPU's capability map (and, for the warning, its measured bf16 slowdown); real decisions after."""
    def force(caps, factor=480.0):
        monkeypatch.setattr(precision, "_cpu_capabilities", lambda: caps)
        monkeypatch.setattr(run_precision, "slowdown", lambda dtype: factor)
        monkeypatch.setattr(run_precision, "_WARNED", set())
        precision.half_support.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever runs the tests
    yield force
    precision.half_support.cache_clear()


def recipe(**sections) -> RecipeConfig:
    return dataclasses.replace(RecipeConfig(stages=[StageConfig()]), **sections)


@pytest.mark.parametrize("caps, dtype", [(AVX2, "float32"), (AMX, "bfloat16")])
def test_auto_resolves_for_the_machine_and_is_logged_once(cpu_kind, caplog, caps, dtype):
    cpu_kind(caps)
    with caplog.at_level(logging.INFO, logger="rlkit.training.precision"):
        cfg = run_precision.resolve_recipe(recipe())
    assert (cfg.trainer.dtype, cfg.ref.dtype, cfg.rollout.dtype) == (dtype, dtype, dtype)
    assert cfg.trainer.param_dtype == "float32"  # master weights and Adam state stay float32 either way
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"trainer {dtype}" in lines[0]
    assert ("with amx_bf16" if dtype == "bfloat16" else "without avx512_bf16 or amx_bf16") in lines[0]
    assert "dtype: auto" not in cfg_yaml(cfg)  # the run folder's recipe.yaml says what ran


def cfg_yaml(cfg) -> str:
    from rlkit.recipe import to_yaml

    return to_yaml(cfg)


def test_explicit_dtypes_stay_and_emulated_half_warns_once_with_the_factor(cpu_kind, caplog):
    cpu_kind(AVX2, factor=512.0)
    cfg = recipe(trainer=TrainerConfig(dtype="bfloat16"), ref=RefConfig(dtype="float64"),
                 rollout=RolloutConfig(dtype="bfloat16"))
    with caplog.at_level(logging.WARNING, logger="rlkit.training.precision"):
        resolved = run_precision.resolve_recipe(cfg)
        run_precision.resolve_recipe(cfg)  # a second resolution in the same process says nothing new
    assert (resolved.trainer.dtype, resolved.ref.dtype, resolved.rollout.dtype) == ("bfloat16", "float64", "bfloat16")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # trainer.dtype and rollout.dtype, once each
    assert warnings[0].startswith("trainer.dtype=bfloat16: CPU x86_64 without avx512_bf16 or amx_bf16")
    assert "512x slower than float32" in warnings[0] and "set trainer.dtype=auto" in warnings[0]
    assert "set rollout.dtype=auto" in warnings[1]


def test_native_half_does_not_warn(cpu_kind, caplog):
    cpu_kind(AMX)
    with caplog.at_level(logging.WARNING, logger="rlkit.training.precision"):
        run_precision.resolve_recipe(recipe(trainer=TrainerConfig(dtype="bfloat16")))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_devices_follow_the_recipe():
    ray = recipe(cluster=ClusterConfig(backend="ray", gpus_per_trainer=1, gpus_per_engine=0))
    assert run_precision.recipe_devices(ray) == ("cuda", "cpu")
    local = "cuda" if torch.cuda.is_available() else "cpu"
    assert run_precision.recipe_devices(recipe()) == (local, local)


@pytest.mark.parametrize("caps, dtype", [(AVX2, torch.float32), (AMX, torch.bfloat16)])
def test_workers_built_alone_resolve_auto_the_same_way(cpu_kind, model_path, caps, dtype):
    cpu_kind(caps)
    ref = ReferenceModel(RefConfig(), model_path, 8, "torch")
    assert ref.model.lm.dtype == dtype
    trainer = ShardedTrainer(TrainerConfig(logprob_impl="torch"), model_path, lr=1e-3, warmup_steps=0)
    assert trainer.cfg.dtype == str(dtype).removeprefix("torch.")
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # mixed precision or plain float32
