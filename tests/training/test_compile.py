"""trainer.compile: compiled transformer blocks give eager's log-probs and gradients, a new micro-batch length reuses
the compiled graph, and policy, critic and reference all compile their blocks.

Inductor reorders float arithmetic (fused kernels, other reductions), so compiled and eager agree to float32
rounding, not bit for bit; in float32 a few 1e-6 of drift per op is all there is.
"""

import shutil

import pytest
import torch

from rlkit.recipe import RecipeError, RefConfig, TrainerConfig, load_recipe
from rlkit.training.critic import CriticTrainer
from rlkit.training.losses import SFTLoss
from rlkit.training.rank import compile_blocks, compile_seconds
from rlkit.training.reference import ReferenceModel
from rlkit.training.trainer import LogprobModel, ShardedTrainer, load_causal_lm
from rlkit.training.batches import SFTBatch, pack_sequences


def batch_of(n: int, seed: int):
    """n rows of 3-10 tokens (prompts 2-5, responses 1-6): each seed gives other lengths."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, hi: int) -> list[int]:
        return torch.randint(4, 90, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return pack_sequences([draw(2, 6) for _ in range(n)], [draw(1, 7) for _ in range(n)], pad_id=0)


def logprobs_and_grads(model: LogprobModel, batch):
    """Log-probs (B, L-1) of a forward with gradients, and every weight's gradient of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logprobs, _ = model(batch, impl="torch")
    weights = torch.linspace(-1.0, 1.0, logprobs.numel()).view_as(logprobs)  # every target's gradient differs
    (logprobs * weights).sum().backward()
    return logprobs.detach(), {name: p.grad.clone() for name, p in model.lm.named_parameters()}


def test_compiled_blocks_give_the_eager_logprobs_and_gradients_at_any_length(model_path):
    cfg = TrainerConfig(logprob_impl="torch", dtype="float32")
    eager, compiled = LogprobModel(load_causal_lm(model_path, cfg)), LogprobModel(load_causal_lm(model_path, cfg))
    compile_blocks(list(compiled.lm.model.layers), True)
    before = compile_seconds()
    for step, batch in enumerate((batch_of(8, 0), batch_of(5, 1), batch_of(7, 2))):  # (8, 11), (5, 10), (7, 9)
        expected, expected_grads = logprobs_and_grads(eager, batch)
        logprobs, grads = logprobs_and_grads(compiled, batch)
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-5)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=2e-6, msg=name)
        if step == 0:
            assert compile_seconds() > before  # the first batch compiled (Dynamo's clock moved)
            before = compile_seconds()
    assert compile_seconds() == before  # other rows and lengths: dynamic shapes, no recompile


def compiled(module) -> bool:
    return hasattr(module.forward, "_torchdynamo_orig_callable")  # torch.compile's wrapper of the bound forward


def test_policy_critic_and_reference_compile_their_blocks_only_when_asked(model_path):
    for flag in (False, True):
        cfg = TrainerConfig(compile=flag, gradient_checkpointing=True, dtype="float32")
        policy = ShardedTrainer(cfg, model_path, lr=1e-3, warmup_steps=1)
        critic = CriticTrainer(cfg, model_path, lr=1e-3, warmup_steps=1)
        ref = ReferenceModel(RefConfig(dtype="float32"), model_path, compile=flag)
        blocks = [*policy.model.lm.model.layers, *critic.model.body.layers, *ref.model.lm.model.layers]
        assert [compiled(b) for b in blocks] == [flag] * len(blocks)
        assert not compiled(policy.model.lm.model.embed_tokens)  # the embedding, mask building and head stay eager


@pytest.mark.slow  # three compiles (packed rows, LoRA, the recompute); about a minute on 2 cores
def test_a_compiled_lora_trainer_with_packing_and_checkpointing_takes_the_eager_steps(model_path):
    results = []
    for flag in (False, True):
        cfg = TrainerConfig(micro_batch_size=4, logprob_impl="torch", lora_rank=4, packing=True,
                            gradient_checkpointing=True, compile=flag, dtype="float32")
        trainer = ShardedTrainer(cfg, model_path, lr=1e-2, warmup_steps=1)
        metrics = []
        for seed in (0, 1):
            batch = batch_of(8, seed)
            metrics.append(trainer.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum()))).metrics())
        results.append(({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, metrics))
    (eager, eager_metrics), (state, metrics) = results
    assert "perf/compile_seconds" not in eager_metrics[0]
    assert metrics[0]["perf/compile_seconds"] > 0 and metrics[1]["perf/compile_seconds"] == 0  # no recompile
    for (a, b) in zip(eager_metrics, metrics):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    for name, value in eager.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-5, msg=name)


def test_compile_without_a_cpp_compiler_is_refused_at_recipe_load(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RecipeError, match=r"trainer.compile: .*C\+\+ compiler.*trainer.compile=false"):
        load_recipe(None, ["trainer.compile=true"])
    assert not load_recipe(None, ["trainer.compile=false"]).trainer.compile


@pytest.mark.slow  # a compile of the FSDP2-wrapped blocks; about half a minute on 2 cores
def test_compiled_blocks_under_fsdp2_give_the_eager_logprobs_and_gradients(model_path, monkeypatch):
    """FSDP2's hooks and gradient checkpointing's recompute wrap the compiled forward (a 1-rank process group in
    this process; the 2-rank tests run eager)."""
    import torch.distributed as dist

    from rlkit.runtime.cluster import _free_port
    from rlkit.training.rank import enable_gradient_checkpointing, shard_with_fsdp2

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    cfg = TrainerConfig(logprob_impl="torch", gradient_checkpointing=True, compile=True, dtype="float32")
    eager, lm = LogprobModel(load_causal_lm(model_path, cfg)), load_causal_lm(model_path, cfg)
    enable_gradient_checkpointing(lm, cfg)
    compile_blocks(list(lm.model.layers), True)
    sharded = LogprobModel(lm)
    shard_with_fsdp2(sharded, list(lm.model.layers), 0, 1, cfg)
    try:
        for batch in (batch_of(8, 0), batch_of(5, 1)):
            expected, expected_grads = logprobs_and_grads(eager, batch)
            logprobs, grads = logprobs_and_grads(sharded, batch)
            torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-5)
            for name, grad in expected_grads.items():
                torch.testing.assert_close(grads[name].full_tensor(), grad, rtol=1e-4, atol=2e-6, msg=name)
    finally:
        dist.destroy_process_group()
