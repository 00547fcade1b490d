"""rlkit.training.attention: packed rows attend within themselves with no (T, T) mask, exactly as right-padded rows do
(log-probs and every gradient, float64, a GQA Llama), padded forwards of the same model stay transformers' sdpa, and
every loader picks the per-row sdpa only for packed rows under sdpa."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from rlkit.training.attention import VARLEN_SDPA, model_attn_implementation, row_lengths
from rlkit.recipe import RefConfig, TrainerConfig
from rlkit.training.reference import ReferenceModel
from rlkit.training.trainer import LogprobModel, load_causal_lm
from rlkit.training.batches import pack_sequences

LENGTHS = [7, 2, 7, 8, 1]  # rows of the batch below: two of one length (one batched call), a 1-token row


def gqa_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)  # 2 heads per KV head
    return LlamaForCausalLM(config).double()


def batch():
    g = torch.Generator().manual_seed(1)
    sizes = [(3, 4), (1, 1), (5, 2), (2, 6), (1, 0)]  # (prompt, response): rows of LENGTHS, width 8
    draw = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    return pack_sequences([draw(p) for p, _ in sizes], [draw(r) for _, r in sizes], pad_id=0)


def logprobs_and_grads(lm, tokens, packing: bool):
    lm.zero_grad(set_to_none=True)
    logprobs, _ = LogprobModel(lm, packing)(tokens, impl="torch")  # (B, L-1)
    weights = torch.linspace(-1.0, 1.0, logprobs.numel(), dtype=torch.float64).view_as(logprobs)
    (logprobs * weights).sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


class SdpaCalls:
    """Records torch's scaled_dot_product_attention calls: (query shape, whether a mask came with it)."""

    def __init__(self, monkeypatch):
        self.calls, self.sdpa = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, query, key, value, attn_mask=None, **kwargs):
        self.calls.append((tuple(query.shape), attn_mask is not None))
        return self.sdpa(query, key, value, attn_mask=attn_mask, **kwargs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_run_unmasked_per_row_and_equal_padded_rows(monkeypatch, checkpointing):
    tokens = batch()
    assert tokens.attention_mask.sum(-1).tolist() == LENGTHS
    lm = gqa_llama(model_attn_implementation("sdpa", packing=True))
    expected, expected_grads = logprobs_and_grads(lm, tokens, packing=False)
    if checkpointing:  # as rlkit.training.rank.enable_gradient_checkpointing: each block runs again in the backward
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    spy = SdpaCalls(monkeypatch)
    logprobs, grads = logprobs_and_grads(lm, tokens, packing=True)
    # per layer: the two 7-token rows as one (2, 4, 7, 8) call, then rows of 2, 8 and 1 tokens; never a mask, never
    # a call over the packed 25 tokens (query (batch, heads, tokens, head_dim))
    per_layer = [((2, 4, 7, 8), False), ((1, 4, 2, 8), False), ((1, 4, 8, 8), False), ((1, 4, 1, 8), False)]
    assert spy.calls == per_layer * (4 if checkpointing else 2)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-12)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-12, msg=name)


def test_no_dense_mask_is_built_for_packed_rows(monkeypatch):
    from transformers import AttentionMaskInterface

    lm, seen = gqa_llama(model_attn_implementation("sdpa", packing=True)), []
    mask_fn = AttentionMaskInterface._global_mapping[VARLEN_SDPA]
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, VARLEN_SDPA,
                        lambda *a, **kw: seen.append(mask_fn(*a, **kw)) or seen[-1])
    tokens = batch()
    LogprobModel(lm, packing=True)(tokens, impl="torch")
    assert seen == [None]  # the model asked for its mask once, and got none
    LogprobModel(lm, packing=False)(tokens, impl="torch")
    assert seen[1].shape == (5, 1, 8, 8)  # padded rows: sdpa's boolean mask, as before


def test_padded_rows_are_plain_sdpa():
    tokens = batch()
    expected = logprobs_and_grads(gqa_llama("sdpa"), tokens, packing=False)[0]
    logprobs = logprobs_and_grads(gqa_llama(model_attn_implementation("sdpa", True)), tokens, packing=False)[0]
    assert torch.equal(logprobs, expected)  # same calls, bit for bit


def test_row_lengths_from_position_ids_or_cumulative_lengths():
    assert row_lengths(torch.tensor([[0, 1, 2, 0, 0, 1]])) == [3, 1, 2]
    assert row_lengths(torch.tensor([[0, 1, 2, 3]])) == [4]
    assert row_lengths(None, torch.tensor([0, 3, 4, 6])) == [3, 1, 2]


def test_sliding_window_longer_than_a_row_is_refused():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                           attn_implementation=model_attn_implementation("sdpa", True))
    with pytest.raises(NotImplementedError, match="sliding window.*trainer.packing=false"):
        LogprobModel(MistralForCausalLM(config), packing=True)(batch(), impl="torch")


def test_loaders_pick_per_row_sdpa_for_packed_rows_only(model_path):
    assert model_attn_implementation("eager", True) == "eager"
    assert model_attn_implementation("flash_attention_2", True) == "flash_attention_2"  # varlen already
    for packing, name in ((True, VARLEN_SDPA), (False, "sdpa")):
        lm = load_causal_lm(model_path, TrainerConfig(packing=packing))
        ref = ReferenceModel(RefConfig(), model_path, packing=packing)
        assert lm.config._attn_implementation == ref.model.lm.config._attn_implementation == name


def test_auto_takes_flash_attention_where_it_runs(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)  # as on CUDA with flash-attn
    assert model_attn_implementation("auto", True, torch.bfloat16) == "flash_attention_2"
    assert model_attn_implementation("auto", True, torch.float32) == VARLEN_SDPA  # flash-attn has no float32 kernels
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert model_attn_implementation("auto", False, torch.bfloat16) == "sdpa"
