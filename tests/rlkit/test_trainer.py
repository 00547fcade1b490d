"""The trainer rank: response masking, updates that do not depend on how the batch is cut, and tied embeddings
that stay one tensor through a step, a checkpoint and a resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlkit.config import AlgoConfig, RefConfig, TrainerConfig
from rlkit.losses import token_normalizer
from rlkit.trainer import PairBatch, PolicyBatch, ShardedTrainer, pack_sequences


def make_trainer(model_path, micro_batch_size, lora_rank=0):
    # float64: Adam's first step is about lr * sign(grad), so float32 noise on near-zero gradients would
    # flip signs and hide a real difference; in float64 any mismatch beyond 1e-9 is a bug.
    cfg = TrainerConfig(micro_batch_size=micro_batch_size, logprob_impl="torch", warmup_steps=1, dtype="float64",
                        lora_rank=lora_rank)
    return ShardedTrainer(cfg, AlgoConfig(), RefConfig(), model_path, lr=1e-2, warmup_steps=1)


def random_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(4, 90, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return pack_sequences(prompts, responses, pad_id=0)


def test_pack_sequences_marks_only_response_targets():
    batch = pack_sequences([[1, 5, 6]], [[7, 2]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 2]]
    # targets are [5, 6, 7, 2]; only 7 and 2 belong to the response
    assert batch.response_mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_logprobs_are_zero_off_the_response(model_path):
    trainer = make_trainer(model_path, 4)
    batch = random_batch()
    lp = trainer.logprobs(batch)
    assert lp.shape == batch.response_mask.shape
    assert (lp[batch.response_mask == 0] == 0).all() and (lp[batch.response_mask == 1] < 0).all()


def params(trainer):
    return {k: v.clone() for k, v in trainer.full_state_dict().items()}


def assert_same(a, b, tol=1e-9):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), k


def test_sft_update_is_invariant_to_micro_batch_size(model_path):
    batch = random_batch()
    results = []
    for mb in (8, 3, 1):
        trainer = make_trainer(model_path, mb)
        metrics = trainer.sft_step(batch, float(batch.response_mask.sum()))
        results.append((params(trainer), metrics["loss"]))
    for p, loss in results[1:]:
        assert_same(results[0][0], p)
        assert loss == pytest.approx(results[0][1], rel=1e-5)


@pytest.mark.parametrize(
    "loss_agg, ratio_level, tis, on_policy",
    [
        ("token-mean", "token", 0.0, False),
        ("seq-mean-token-mean", "token", 0.0, True),
        ("seq-mean-token-mean", "sequence", 2.0, False),
        ("token-mean", "token", 1.5, True),
    ],
)
def test_policy_update_is_invariant_to_micro_batch_size(model_path, loss_agg, ratio_level, tis, on_policy):
    batch = random_batch()
    trainer = make_trainer(model_path, 8)
    old = trainer.logprobs(batch)
    g = torch.Generator().manual_seed(1)
    noise = 0.1 * torch.randn(old.shape, generator=g, dtype=old.dtype) * batch.response_mask
    policy = PolicyBatch(
        batch, batch.response_mask, None if on_policy else old, old + noise, old - noise,
        torch.randn(8, generator=g, dtype=old.dtype), float(token_normalizer(batch.response_mask, loss_agg)), 0.05, 1.0,
    )
    results = []
    for mb in (8, 2):
        trainer = make_trainer(model_path, mb)
        trainer.algo = AlgoConfig(loss_agg=loss_agg, ratio_level=ratio_level, tis_cap=tis)
        trainer.policy_step(policy)
        results.append(params(trainer))
    assert_same(results[0], results[1])


def test_on_policy_step_equals_a_step_with_the_recomputed_old_logprobs(model_path):
    # Skipping the separate "old" forward must not change the update: old = this forward, detached.
    batch = random_batch()
    old = make_trainer(model_path, 8).logprobs(batch)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(8, generator=g, dtype=old.dtype)
    results = []
    for given in (old, None):
        trainer = make_trainer(model_path, 4)
        trainer.policy_step(PolicyBatch(batch, batch.response_mask, given, old, old, adv,
                                        float(batch.response_mask.sum()), 0.05, 1.0))
        results.append(params(trainer))
    assert_same(results[0], results[1])


def test_dpo_step_raises_the_chosen_margin(model_path):
    chosen_rejected = pack_sequences([[1, 10, 11]] * 4, [[20, 2], [30, 2], [21, 2], [31, 2]], pad_id=0)
    trainer = make_trainer(model_path, 4)
    ref = trainer.logprobs(chosen_rejected).sum(-1)
    for _ in range(5):
        metrics = trainer.dpo_step(PairBatch(chosen_rejected, ref, 2))
    assert metrics["reward_margin"] > 0 and metrics["pair_accuracy"] == 1.0


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def assert_tied(lm):
    assert lm.config.tie_word_embeddings and lm.get_output_embeddings().weight is lm.get_input_embeddings().weight


def assert_saved_tied(path, expected_embedding):
    """A Hugging Face checkpoint whose output embedding is its input embedding, holding `expected_embedding`."""
    assert json.loads((Path(path) / "config.json").read_text())["tie_word_embeddings"] is True
    assert HEAD not in load_file(Path(path) / "model.safetensors")  # stored once, beside the tie in the config
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    assert_tied(model)
    assert torch.equal(model.get_input_embeddings().weight.detach(), expected_embedding)


def sft(trainer, batch):
    return trainer.sft_step(batch, float(batch.response_mask.sum()))


def test_tied_embeddings_stay_one_tensor_through_a_step_a_save_and_a_resume(chat_model_path, tmp_path):
    trainer = make_trainer(chat_model_path, 4)
    assert_tied(trainer.model.lm)
    initial = trainer.full_state_dict()[EMBED].clone()
    sft(trainer, random_batch())
    state = trainer.full_state_dict()
    assert not torch.equal(state[EMBED], initial)  # the step moved the shared tensor
    assert torch.equal(state[HEAD], state[EMBED])
    assert_saved_tied(trainer.save(str(tmp_path / "ckpt"), chat_model_path, ""), state[EMBED])

    trainer.save_state(str(tmp_path / "state"))
    resumed = make_trainer(chat_model_path, 4)
    resumed.load_state(str(tmp_path / "state"))
    assert_tied(resumed.model.lm)  # loading the state did not give the LM head a tensor of its own
    assert_same(params(trainer), params(resumed), tol=0)
    # the next step, Adam moments and schedule included, is the one the uninterrupted trainer takes
    batch = random_batch(seed=1)
    assert sft(resumed, batch)["loss"] == sft(trainer, batch)["loss"]
    assert_same(params(trainer), params(resumed), tol=0)
    assert_tied(resumed.model.lm)


def test_a_lora_trainer_saves_a_tied_model_tied(chat_model_path, tmp_path):
    """Merged LoRA weights are saved through a fresh model (from_config + load_state_dict), as with FSDP2 ranks."""
    trainer = make_trainer(chat_model_path, 4, lora_rank=4)
    for seed in range(2):
        sft(trainer, random_batch(seed=seed))
    state = trainer.full_state_dict()
    assert torch.equal(state[HEAD], state[EMBED])
    assert_saved_tied(trainer.save(str(tmp_path / "ckpt"), chat_model_path, ""), state[EMBED])
