"""LoRA: only adapters train, and the merged weights the engine and checkpoints get equal the trained model."""

import torch
from transformers import AutoModelForCausalLM

from rlkit.recipe import TrainerConfig
from rlkit.training.losses import SFTLoss
from rlkit.training.trainer import ShardedTrainer, batched_logprobs
from rlkit.training.batches import SFTBatch
from tests.training.test_trainer import random_batch


def test_lora_trains_adapters_and_merges_for_sync_and_save(model_path, tmp_path):
    cfg = TrainerConfig(micro_batch_size=4, logprob_impl="torch", lora_rank=4, lora_alpha=8.0, warmup_steps=1,
                        dtype="float32")
    trainer = ShardedTrainer(cfg, model_path, lr=5e-2, warmup_steps=1)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    base = AutoModelForCausalLM.from_pretrained(model_path)
    batch = random_batch()
    first = trainer.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum()))).stats.loss
    for _ in range(5):
        last = trainer.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum()))).stats.loss
    assert last < first

    merged = trainer.full_state_dict()
    assert set(merged) == set(base.state_dict())  # the plain model's names: what vLLM and HF expect
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])  # frozen

    saved = trainer.save(str(tmp_path / "ckpt"), model_path, "")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    expected = trainer.logprobs(batch)
    assert torch.allclose(batched_logprobs(reloaded, batch, 8, impl="torch"), expected, atol=1e-5)


def test_adapter_sync_sends_the_base_once_and_then_only_the_adapter(model_path):
    cfg = TrainerConfig(micro_batch_size=4, logprob_impl="torch", lora_rank=4, lora_alpha=8.0, warmup_steps=1,
                        dtype="float32")
    trainer = ShardedTrainer(cfg, model_path, lr=5e-2, warmup_steps=1)
    batch = random_batch()
    for _ in range(3):
        trainer.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum())))

    base = AutoModelForCausalLM.from_pretrained(model_path).state_dict()
    frozen = trainer.full_state_dict(merged=False)
    assert set(frozen) == set(base) and all(torch.equal(frozen[k], base[k]) for k in base)  # untouched by training

    adapter = trainer.adapter_state_dict()
    name = "model.layers.0.self_attn.q_proj"
    a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
    assert a.shape == (4, base[f"{name}.weight"].shape[1]) and b.shape == (base[f"{name}.weight"].shape[0], 4)
    assert len(adapter) == 2 * 7 * trainer.model.lm.config.num_hidden_layers  # A and B of every target, no base
    # base + alpha / r * B @ A is what the merged sync sends: the two kinds of sync describe the same model
    merged = trainer.full_state_dict()
    assert torch.allclose(merged[f"{name}.weight"], base[f"{name}.weight"] + 8.0 / 4 * b @ a, atol=1e-6)
