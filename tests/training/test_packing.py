"""rlkit.training.packing: token-budget micro-batches worked out by hand, and packed rows that give exactly what padded rows
give (log-probs, entropies, values, gradients) on a tiny Llama and a tiny tied Qwen2 (GQA: 2 heads, 1 KV head) in
float64, under transformers' sdpa (a dense block-diagonal mask) and rlkit.training.attention's per-row sdpa (no mask)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlkit.training.attention import model_attn_implementation
from rlkit.training.critic import ValueModel
from rlkit.training.packing import balance_rows, pack_rows, pad_rows, split_micro_batches, token_budget_split
from rlkit.training.trainer import LogprobModel
from rlkit.training.batches import pack_sequences


# -- which rows go together ----------------------------------------------------------------------------------
def test_token_budget_split_first_fit_decreasing():
    # lengths 5 9 3 4 12 2, budget 12, longest first: 12 -> A (full); 9 -> B; 5 -> C (B would hold 14);
    # 4 -> C (9); 3 -> B (12); 2 -> C (11).
    assert token_budget_split([5, 9, 3, 4, 12, 2], budget=12, max_rows=8) == [[4], [1, 2], [0, 3, 5]]
    # the row cap closes a micro-batch before the budget: 1-token rows, 2 per micro-batch
    assert token_budget_split([1, 1, 1, 1, 1], budget=100, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_a_row_longer_than_the_budget_runs_alone():
    assert token_budget_split([30, 2, 3], budget=10, max_rows=8) == [[0], [1, 2]]


def test_min_count_halves_the_heaviest_micro_batch_within_the_budget():
    # From [[4] 12, [1, 2] 12, [0, 3, 5] 11]: [4] cannot be split, so [1, 2] is halved into [1] and [2] (appended);
    # then the heaviest splittable one is [0, 3, 5] (11): rows longest first 0 (5), 3 (4), 5 (2) dealt -> [0, 5], [3].
    lengths = [5, 9, 3, 4, 12, 2]
    assert token_budget_split(lengths, 12, 8, min_count=4) == [[4], [1], [0, 3, 5], [2]]
    assert token_budget_split(lengths, 12, 8, min_count=5) == [[4], [1], [0, 5], [2], [3]]
    with pytest.raises(ValueError, match="cannot split 6 rows into 7"):
        token_budget_split(lengths, 12, 8, min_count=7)


def test_pairs_stay_together_and_in_order():
    # pairs (rows 0-1: 7 tokens), (2-3: 3), (4-5: 9) under a 10-token budget: 9 -> A; 7 -> B; 3 -> B (10)
    assert split_micro_batches([3, 4, 1, 2, 5, 4], max_rows=4, budget=10, unit=2) == [[4, 5], [0, 1, 2, 3]]
    # max_rows counts rows: 2 rows hold one pair, the heaviest first
    assert split_micro_batches([3, 4, 1, 2, 5, 4], max_rows=2, budget=100, unit=2) == [[4, 5], [0, 1], [2, 3]]


def test_pack_and_pad_layouts():
    batch = pack_sequences([[1, 5], [1, 6, 6]], [[7, 2], [8]], pad_id=0)  # rows of 4 and 4 tokens, width 4
    packed = pack_rows(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert packed.input_ids.tolist() == [[1, 5, 7, 2, 1, 6, 6, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]] and packed.attention_mask is None
    # row 0 targets 7, 2 from positions 1, 2; row 1 targets 8 from its position 2 = packed position 4 + 2
    assert packed.source.tolist() == [1, 2, 6] and packed.targets.tolist() == [7, 2, 8]
    assert packed.dest.tolist() == [1, 2, 5]  # in the (2, 3) target table
    short = pack_sequences([[1, 5], [1]], [[7], [8]], pad_id=0)  # rows of 3 and 2 tokens
    padded = pad_rows(short.input_ids, short.attention_mask, short.response_mask)
    assert padded.input_ids.shape == (2, 3) and padded.source.tolist() == [1, 3]  # row 1 position 0 = 1 * 3 + 0
    assert padded.scatter(torch.tensor([-1.0, -2.0])).tolist() == [[0.0, -1.0], [-2.0, 0.0]]


# -- packed equals padded, exactly ---------------------------------------------------------------------------
# the packed forward's attention: transformers' sdpa over a dense (T, T) mask, or per-row sdpa (what packing loads)
ATTENTION = ["sdpa", model_attn_implementation("sdpa", packing=True)]


def tiny_llama(attn: str = "sdpa"):
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, attn_implementation=attn))


def tiny_qwen2_tied(attn: str = "sdpa"):
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                        attn_implementation=attn))


def ragged_batch():
    g = torch.Generator().manual_seed(0)
    # (prompt, response) tokens: rows of 7, 2, 7, 8 in a width of 8 (per-row sdpa runs the two 7s as one call)
    sizes = [(3, 4), (1, 1), (5, 2), (2, 6)]
    draw = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    return pack_sequences([draw(p) for p, _ in sizes], [draw(r) for _, r in sizes], pad_id=0)


def grads_of(model, outputs, weights):
    model.zero_grad(set_to_none=True)
    sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2_tied])
@pytest.mark.parametrize("train", [True, False])  # eval mode: the config's use_cache=True must not leak rows
def test_packed_logprobs_entropy_and_gradients_equal_padded(build, train, attn):
    torch.manual_seed(0)
    lm = build(attn).double().train(train)  # one model runs both layouts, as a loaded trainer's does
    batch = ragged_batch()
    weights = [torch.randn(batch.response_mask.shape, dtype=torch.float64) for _ in range(2)]
    results = []
    for packing in (True, False):
        model = LogprobModel(lm, packing)
        logprobs, entropy = model(batch, temperature=0.7, impl="torch", return_entropy=True)
        results.append((logprobs.detach(), entropy.detach(), grads_of(model, (logprobs, entropy), weights)))
    (lp, ent, grads), (lp_pad, ent_pad, grads_pad) = results
    assert (lp[batch.response_mask == 0] == 0).all() and (lp[batch.response_mask == 1] < 0).all()
    torch.testing.assert_close(lp, lp_pad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, ent_pad, rtol=0, atol=1e-12)
    assert grads.keys() == grads_pad.keys() and len(grads) == len(list(lm.parameters()))
    for name in grads:
        torch.testing.assert_close(grads[name], grads_pad[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_values_and_gradients_equal_padded(attn):
    torch.manual_seed(0)
    body = tiny_llama(attn).model.double()
    batch = ragged_batch()
    weights = [torch.randn(batch.response_mask.shape, dtype=torch.float64)]
    model = ValueModel(body)
    torch.nn.init.normal_(model.head.weight)  # a zero head would pass no gradient into the body
    results = []
    for packing in (True, False):
        model.packing = packing
        values = model(batch)
        results.append((values.detach(), grads_of(model, (values,), weights)))
    (v, grads), (v_pad, grads_pad) = results
    assert (v[batch.response_mask == 0] == 0).all() and (v[batch.response_mask == 1] != 0).all()
    torch.testing.assert_close(v, v_pad, rtol=0, atol=1e-6)  # the head's values are float32
    for name in grads_pad:
        torch.testing.assert_close(grads[name], grads_pad[name], rtol=0, atol=1e-6, msg=name)


# -- which rows go to which trainer rank ---------------------------------------------------------------------
def test_balance_rows_evens_out_prompt_major_lengths():
    # GRPO order, 2 prompts x 4 samples: the first prompt's samples are long. Contiguous shares carry 42 and 14
    # tokens (3x). Longest first to the least-loaded rank with room: 12 -> A; 11 -> B; 10 -> B (21); 9 -> A (21);
    # 5 -> A (tie, lower rank; 26); 4 -> B (25); 3 -> B (28, full); 2 -> A (28).
    lengths = [12, 10, 11, 9, 3, 4, 2, 5]
    shares = balance_rows(lengths, ranks=2)
    assert shares == [[0, 3, 6, 7], [1, 2, 4, 5]]
    assert [sum(lengths[i] for i in s) for s in shares] == [28, 28]


def test_balance_rows_gives_every_rank_the_same_count():
    # one 100-token row cannot be offset by rows, only by counts: its rank takes the last 1-token row, when the
    # others are full (2 rows each): 100 -> A; 1s go B, C, B, C, then A.
    assert balance_rows([100, 1, 1, 1, 1, 1], ranks=3) == [[0, 5], [1, 3], [2, 4]]


def test_balance_rows_keeps_pairs_together_and_in_order():
    # pairs (0-1: 11 tokens), (2-3: 2), (4-5: 14), (6-7: 4); contiguous shares carry 13 and 18.
    # 14 -> A; 11 -> B; 4 -> B (15); 2 -> A (16).
    assert balance_rows([5, 6, 1, 1, 7, 7, 2, 2], ranks=2, unit=2) == [[2, 3, 4, 5], [0, 1, 6, 7]]


def test_balance_rows_on_one_rank_keeps_the_order():
    assert balance_rows([3, 9, 1, 4], ranks=1) == [[0, 1, 2, 3]]
    assert balance_rows([3, 9, 1, 4], ranks=1, unit=2) == [[0, 1, 2, 3]]


def test_balance_rows_refuses_uneven_counts():
    with pytest.raises(ValueError, match="3 rows do not split evenly over 2 trainer ranks"):
        balance_rows([1, 2, 3], ranks=2)
    with pytest.raises(ValueError, match=r"6 rows do not split evenly over 2 trainer ranks \(whole units of 2"):
        balance_rows([1] * 6, ranks=2, unit=2)  # 3 pairs: one rank would split a pair


@pytest.mark.parametrize("seed", range(5))
def test_balance_rows_is_a_partition_into_equal_whole_units(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 50, (24,), generator=g).tolist()
    for ranks, unit in [(2, 1), (3, 2), (4, 3)]:
        shares = balance_rows(lengths, ranks, unit)
        assert sorted(i for s in shares for i in s) == list(range(24))
        assert {len(s) for s in shares} == {24 // ranks}
        for s in shares:  # ascending, in whole units: each starts at a multiple of `unit`, its rows consecutive
            assert s == sorted(s)
            starts = s[0::unit]
            assert all(i % unit == 0 and s[k * unit : (k + 1) * unit] == list(range(i, i + unit))
                       for k, i in enumerate(starts))
