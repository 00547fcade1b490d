"""The vLLM engine against the trainer's model: same greedy tokens, same log-probs, before and after a sync
(of all weights, or of a LoRA adapter over the base)."""

import copy
import os

import pytest
import torch

from rlkit.config import ModelConfig, RolloutConfig, TrainerConfig
from rlkit.lora import adapter_config, apply_lora, peft_adapter_tensors
from rlkit.modeling import init_model, save_checkpoint
from rlkit.trainer import pack_sequences, sequence_logprobs
from rollout.vllm_engine import VllmRollout, WeightSyncError

PROMPTS = ["12+34=", "7*8=", "99+1=", "5="]
BOUND_OUTSIDE = "VLLM_CPU_OMP_THREADS_BIND" in os.environ  # before any engine of this test session was made


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model, tok = init_model(ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2))
    path = save_checkpoint(model, tok, tmp_path_factory.mktemp("m") / "ckpt", "")
    # LoRA-enabled (rank <= 8): without an adapter it serves the plain weights, which the first tests check
    engine = VllmRollout(RolloutConfig(max_new_tokens=8, sync_timeout_s=30), str(path), max_model_len=64, lora_rank=8)
    yield model, tok, engine
    engine.close()


def prompt_ids(tok):
    return [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in PROMPTS]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_parity(model, tok, engine):
    ids = prompt_ids(tok)
    completions = [g[0] for g in engine.generate(ids, n=1, temperature=0.0)]
    model.eval()
    for p, c in zip(ids, completions):
        expected = hf_greedy(model, p, 8)
        assert list(c.token_ids) == expected[: len(c.token_ids)]
    # log-probs of the sampled tokens (temperature 1 sampling) match the trainer's within float tolerance
    sampled = [c for g in engine.generate(ids, n=2, temperature=1.0, seed=0) for c in g]
    repeated = [p for p in ids for _ in range(2)]
    batch = pack_sequences(repeated, [list(c.token_ids) for c in sampled], tok.pad_token_id)
    with torch.no_grad():
        trainer_lp, _ = sequence_logprobs(model, batch)
    for i, (p, c) in enumerate(zip(repeated, sampled)):
        got = trainer_lp[i, len(p) - 1 : len(p) - 1 + len(c.logprobs)]
        assert torch.allclose(got, torch.tensor(c.logprobs), atol=2e-3), (got, c.logprobs)


def test_engine_matches_trainer_before_and_after_sync(setup):
    model, tok, engine = setup
    check_parity(model, tok, engine)
    before = [g[0].token_ids for g in engine.generate(prompt_ids(tok), n=1, temperature=0.0)]
    with torch.no_grad():  # a different model: the engine must follow it after the sync
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stats = engine.sync_weights(model.state_dict())
    assert stats.seconds > 0 and stats.megabytes > 0
    after = [g[0].token_ids for g in engine.generate(prompt_ids(tok), n=1, temperature=0.0)]
    assert after != before
    check_parity(model, tok, engine)


@pytest.mark.skipif(torch.cuda.is_available() or BOUND_OUTSIDE, reason="CPU binding left to the user or the GPU")
def test_engine_decodes_on_every_allowed_core(setup):
    # vLLM's own "auto" binding would keep one core for its scheduler process (half of a 2-core machine)
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, sorted(os.sched_getaffinity(0))))


def test_engine_serves_the_trainers_adapter_over_its_base(setup):
    model, tok, engine = setup
    engine.sync_weights(model.state_dict())  # the base
    cfg = TrainerConfig(lora_rank=4, lora_alpha=8.0)
    tuned = apply_lora(copy.deepcopy(model), cfg)
    for round_ in range(2):  # a second adapter replaces the first
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(round_))
        stats = engine.sync_adapter(peft_adapter_tensors(tuned.state_dict()), adapter_config(cfg))
        assert 0 < stats.megabytes < 0.2 * sum(p.numel() * 4 for p in model.parameters()) / 2**20
        check_parity(tuned, tok, engine)
    base_greedy = [hf_greedy(model.eval(), p, 8) for p in prompt_ids(tok)]
    assert [g[0].token_ids for g in engine.generate(prompt_ids(tok), n=1, temperature=0.0)] != base_greedy
    engine.sync_weights(model.state_dict())  # a full sync drops the adapter
    check_parity(model, tok, engine)


def test_a_bad_adapter_fails_the_sync(setup):
    model, _, engine = setup
    cfg = TrainerConfig(lora_rank=16)  # above the rank the engine was made for
    tensors = peft_adapter_tensors(apply_lora(copy.deepcopy(model), cfg).state_dict())
    with pytest.raises(WeightSyncError, match="weight sync failed"):
        engine.sync_adapter(tensors, adapter_config(cfg))


def test_sync_with_a_wrong_shape_fails_clearly(setup):
    model, _, engine = setup
    bad = {k: v for k, v in model.state_dict().items()}
    key = next(k for k in bad if k.endswith("q_proj.weight"))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(WeightSyncError):
        engine.sync_weights(bad)


def test_sync_past_its_deadline_raises_instead_of_hanging(setup):
    import dataclasses
    import time

    model, _, engine = setup
    saved = engine.cfg
    engine.cfg = dataclasses.replace(saved, sync_timeout_s=1e-4)  # far below a real reload's ~20 ms
    try:
        start = time.perf_counter()
        with pytest.raises(WeightSyncError, match="did not finish within rollout.sync_timeout_s"):
            engine.sync_weights(model.state_dict())
        assert time.perf_counter() - start < 10
    finally:
        engine.cfg = saved
        engine._pool.submit(lambda: None).result()  # let the abandoned reload finish before the next test
