"""The trainer rank: response masking, updates that do not depend on how the batch is cut, and tied embeddings
that stay one tensor through a step, a checkpoint and a resume."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlkit.recipe import RefConfig, TrainerConfig
from rlkit.training.critic import CriticTrainer
from rlkit.training.batches import ValueBatch
from rlkit.training.losses import DPOLoss, PolicyLoss, SFTLoss, ValueLoss, token_normalizer
from rlkit.training.reference import ReferenceModel
from rlkit.training.trainer import ShardedTrainer
from rlkit.training.batches import PairBatch, PolicyBatch, SFTBatch, pack_sequences


def make_trainer(model_path, micro_batch_size, lora_rank=0, **options):
    # float64: Adam's first step is about lr * sign(grad), so float32 noise on near-zero gradients would
    # flip signs and hide a real difference; in float64 any mismatch beyond 1e-9 is a bug.
    cfg = TrainerConfig(micro_batch_size=micro_batch_size, logprob_impl="torch", warmup_steps=1, lora_rank=lora_rank,
                        **{"dtype": "float64"} | options)
    return ShardedTrainer(cfg, model_path, lr=1e-2, warmup_steps=1)


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


# (micro_batch_size, micro_batch_tokens, packing): rows of 4 to 11 tokens (random_batch), so a 12-token budget runs
# a few rows per micro-batch and a 5-token budget leaves some rows longer than it, alone
SPLITS = [(8, 0, True), (3, 0, True), (1, 0, False), (8, 12, True), (8, 5, True), (3, 12, False)]


def test_sft_update_is_invariant_to_micro_batch_size(model_path):
    batch = random_batch()
    results = []
    for mb, tokens, packing in SPLITS:
        trainer = make_trainer(model_path, mb, micro_batch_tokens=tokens, packing=packing)
        if tokens:
            assert len(trainer.micro_batches(batch)) > 1
        update = sft(trainer, batch)
        results.append((params(trainer), update.stats.loss))
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
        torch.randn(8, generator=g, dtype=old.dtype), float(token_normalizer(batch.response_mask, loss_agg)),
    )
    loss = PolicyLoss(kl_coef=0.05, loss_agg=loss_agg, ratio_level=ratio_level, tis_cap=tis)
    results, logged = [], []
    for mb, tokens in ((8, 0), (2, 0), (8, 12)):
        trainer = make_trainer(model_path, mb, micro_batch_tokens=tokens)
        logged.append(trainer.step(loss, policy).metrics())
        results.append(params(trainer))
    assert_same(results[0], results[1])
    assert_same(results[0], results[2])
    for metrics in logged[1:]:  # the micro-batches' stats add up to the whole batch's
        assert metrics.keys() == logged[0].keys()
        for key in ("loss", "kl", "entropy", "clip_fraction", "approx_kl", "rollout_kl"):
            assert metrics[key] == pytest.approx(logged[0][key], rel=1e-9, abs=1e-12), key


def test_on_policy_step_equals_a_step_with_the_recomputed_old_logprobs(model_path):
    # Skipping the separate "old" forward must not change the update: old = this forward, detached.
    batch = random_batch()
    old = make_trainer(model_path, 8).logprobs(batch)
    g = torch.Generator().manual_seed(2)
    adv = torch.randn(8, generator=g, dtype=old.dtype)
    results = []
    for given in (old, None):
        trainer = make_trainer(model_path, 4)
        trainer.step(PolicyLoss(kl_coef=0.05), PolicyBatch(batch, batch.response_mask, given, old, old, adv,
                                                           float(batch.response_mask.sum())))
        results.append(params(trainer))
    assert_same(results[0], results[1])


def test_without_a_reference_the_step_is_the_step_with_no_kl_term(model_path):
    """GRPO with ref.kl_coef 0 loads no reference: ref_logprobs None updates as a zero KL coefficient does, and
    logs no kl (there is none to measure)."""
    batch = random_batch()
    old = make_trainer(model_path, 8).logprobs(batch)
    adv = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=old.dtype)
    results, logged = [], []
    for ref in (old + 0.3 * batch.response_mask, None):
        trainer = make_trainer(model_path, 4)
        update = trainer.step(PolicyLoss(), PolicyBatch(batch, batch.response_mask, None, ref, old, adv,
                                                        float(batch.response_mask.sum())))
        results.append(params(trainer))
        logged.append("kl" in update.metrics())
    assert_same(results[0], results[1])
    assert logged == [True, False]


def test_dpo_step_raises_the_chosen_margin(model_path):
    chosen_rejected = pack_sequences([[1, 10, 11]] * 4, [[20, 2], [30, 2], [21, 2], [31, 2]], pad_id=0)
    trainer = make_trainer(model_path, 4)
    ref = trainer.logprobs(chosen_rejected).sum(-1)
    for _ in range(5):
        stats = trainer.step(DPOLoss(beta=0.1), PairBatch(chosen_rejected, ref, 2)).stats
    assert stats.reward_margin > 0 and stats.pair_accuracy == 1.0


def test_dpo_update_is_invariant_to_a_token_budget(model_path):
    # Pairs of unequal lengths: a budget bins them by length, each pair's two rows together and in order.
    batch = random_batch(n=8, seed=4)
    ref = make_trainer(model_path, 8).logprobs(batch).sum(-1) + 0.1 * torch.arange(8.0, dtype=torch.float64)
    results = []
    for tokens in (0, 25):  # pairs of 14, 12, 11 and 13 tokens: two micro-batches of 25
        trainer = make_trainer(model_path, 8, micro_batch_tokens=tokens)
        update = trainer.step(DPOLoss(beta=0.1), PairBatch(batch, ref, 4))
        results.append((params(trainer), update.stats.loss, len(trainer.micro_batches(batch, unit=2))))
    assert results[1][2] == 2
    assert_same(results[0][0], results[1][0])
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-12)


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
    return trainer.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum())))


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
    assert sft(resumed, batch).stats.loss == sft(trainer, batch).stats.loss
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


def count_calls(module) -> list:
    """A list that grows by one per run of `module.forward` (forward hooks do not fire on a checkpoint's recompute)."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_recomputes_blocks_without_changing_the_update(model_path, lora_rank):
    batch = random_batch()
    results, calls = [], []
    for checkpointing in (False, True):
        trainer = make_trainer(model_path, 4, lora_rank, gradient_checkpointing=checkpointing)
        calls.append(count_calls(trainer.model.lm.model.layers[0].mlp))
        sft(trainer, batch)
        results.append(params(trainer))
    assert [len(c) for c in calls] == [2, 4]  # 2 micro-batches; checkpointed, each block runs again in the backward
    assert_same(results[0], results[1], tol=1e-12)


def test_gradient_checkpointing_leaves_the_critic_update_unchanged(model_path):
    batch = random_batch()
    mask = batch.response_mask
    g = torch.Generator().manual_seed(0)
    values = ValueBatch(batch, mask, torch.zeros(mask.shape), torch.randn(mask.shape, generator=g) * mask,
                        float(mask.sum()))
    results = []
    for checkpointing in (False, True):
        cfg = TrainerConfig(micro_batch_size=4, dtype="float64", gradient_checkpointing=checkpointing)
        critic = CriticTrainer(cfg, model_path, lr=1e-2, warmup_steps=1)
        calls = count_calls(critic.model.body.layers[0].mlp)
        for _ in range(2):  # the zero-initialised head passes the body a gradient from the second step on
            critic.step(ValueLoss(clip=10.0), values)
        assert critic.values(batch).shape == mask.shape
        results.append({k: v.detach().clone() for k, v in critic.model.state_dict().items()})
    assert len(calls) == 2 * 2 * 2 + 2  # 2 steps x 2 micro-batches x (forward, recompute), then values()
    assert_same(results[0], results[1], tol=1e-12)
    assert not torch.equal(results[1]["body.layers.0.mlp.up_proj.weight"],
                           make_critic_weights(model_path)["layers.0.mlp.up_proj.weight"])


def make_critic_weights(model_path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_path, dtype=torch.float64).state_dict()


def test_bfloat16_is_mixed_precision_over_float32_weights(model_path, tmp_path):
    batch = random_batch()
    full, mixed = make_trainer(model_path, 4, dtype="float32"), make_trainer(model_path, 4, dtype="bfloat16")
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
    lp, lp_mixed = full.logprobs(batch), mixed.logprobs(batch)
    assert lp_mixed.dtype == torch.float32
    assert not torch.equal(lp_mixed, lp) and torch.allclose(lp_mixed, lp, atol=0.05)  # bf16 compute, close
    before = params(mixed)
    sft(mixed, batch)
    assert {s["exp_avg"].dtype for s in mixed.optimizer.state.values()} == {torch.float32}
    state = mixed.full_state_dict()  # what the engines receive: float32 (the engine casts to rollout.dtype)
    assert state[EMBED].dtype == torch.float32 and not torch.equal(state[EMBED], before[EMBED])
    saved = load_file(Path(mixed.save(str(tmp_path / "ckpt"), model_path, "")) / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}  # checkpoints in trainer.dtype, as before
    assert torch.equal(saved[EMBED], state[EMBED].to(torch.bfloat16))


def test_reference_runs_in_ref_dtype_with_the_trainers_micro_batches(model_path):
    batch = random_batch()
    expected = make_trainer(model_path, 8).logprobs(batch)
    ref = ReferenceModel(RefConfig(dtype="float64"), model_path, 3, "torch", micro_batch_tokens=12)
    assert ref.model.lm.dtype == torch.float64
    torch.testing.assert_close(ref.logprobs(batch), expected, rtol=0, atol=1e-12)


def test_sharded_bfloat16_computes_in_bf16_and_reduces_into_float32_shards(model_path, monkeypatch):
    """FSDP2's MixedPrecisionPolicy on a 1-rank process group in this process (the 2-rank tests run float64)."""
    import torch.distributed as dist

    from rlkit.training.rank import shard_with_fsdp2
    from rlkit.training.trainer import LogprobModel, load_causal_lm, sequence_logprobs
    from rlkit.runtime.cluster import _free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    cfg = TrainerConfig(dtype="bfloat16", logprob_impl="torch")
    batch = random_batch()
    expected, _ = sequence_logprobs(load_causal_lm(model_path, TrainerConfig(dtype="float32")), batch, impl="torch")
    lm = load_causal_lm(model_path, cfg)
    model = LogprobModel(lm)
    shard_with_fsdp2(model, list(lm.model.layers), 0, 1, cfg)
    try:
        logprobs, _ = model(batch, impl="torch")
        (-logprobs.sum()).backward()
    finally:
        dist.destroy_process_group()
    assert not torch.equal(logprobs.detach(), expected) and torch.allclose(logprobs.detach(), expected, atol=0.05)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),  # warmup 2 steps: (s + 1) / 2, then the base rate
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),  # then (5 - s) / (5 - 2)
    ("cosine", [0.5, 1.0, 1.0, 0.75, 0.25]),  # then (1 + cos(pi (s - 2) / 3)) / 2
])
def test_each_update_logs_the_learning_rate_its_schedule_gives_it(model_path, schedule, expected):
    cfg = TrainerConfig(micro_batch_size=8, logprob_impl="torch", lr_schedule=schedule)
    trainer = ShardedTrainer(cfg, model_path, lr=1e-3, warmup_steps=2, total_steps=5)
    batch = random_batch()
    lrs = [sft(trainer, batch).lr for _ in range(5)]
    assert lrs == pytest.approx([1e-3 * f for f in expected])
