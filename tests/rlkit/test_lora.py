"""LoRA: only adapters train, and the merged weights the engine and checkpoints get equal the trained model."""

import torch
from transformers import AutoModelForCausalLM

from rlkit.config import AlgoConfig, RefConfig, TrainerConfig
from rlkit.trainer import ShardedTrainer, batched_logprobs
from tests.rlkit.test_trainer import random_batch


def test_lora_trains_adapters_and_merges_for_sync_and_save(model_path, tmp_path):
    cfg = TrainerConfig(micro_batch_size=4, logprob_impl="torch", lora_rank=4, lora_alpha=8.0, warmup_steps=1)
    trainer = ShardedTrainer(cfg, AlgoConfig(), RefConfig(), model_path, lr=5e-2, warmup_steps=1)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    base = AutoModelForCausalLM.from_pretrained(model_path)
    batch = random_batch()
    first = trainer.sft_step(batch, float(batch.response_mask.sum()))["loss"]
    for _ in range(5):
        last = trainer.sft_step(batch, float(batch.response_mask.sum()))["loss"]
    assert last < first

    merged = trainer.full_state_dict()
    assert set(merged) == set(base.state_dict())  # the plain model's names: what vLLM and HF expect
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(merged["model.embed_tokens.weight"], base.state_dict()["model.embed_tokens.weight"])  # frozen

    saved = trainer.save(str(tmp_path / "ckpt"), model_path, "")
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    expected = trainer.logprobs(batch)
    assert torch.allclose(batched_logprobs(reloaded, batch, 8, impl="torch"), expected, atol=1e-5)
