"""Each loss against numbers worked out by hand in the comments."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlkit.training.losses import (DPOLoss, DPOStats, Forward, PolicyStats, SFTLoss, SFTStats, aggregate, cispo_loss, dpo_loss,
                          kl_estimate, policy_loss, sft_loss, token_normalizer)
from rlkit.training.rank import Update


def test_kl_estimators_by_hand():
    # policy p = 0.5, reference q = 0.25 on the sampled token: r = log q - log p = log(1/2) = -0.693147
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(0.5)
    assert kl_estimate(logp, ref, "k1").item() == pytest.approx(-r)  # 0.693147
    assert kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * r * r)  # 0.240227
    # k3 = exp(r) - 1 - r = 0.5 - 1 + 0.693147 = 0.193147
    assert kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-6)


def test_k3_is_zero_at_equal_policies_and_never_negative():
    x = torch.randn(100)
    assert torch.allclose(kl_estimate(x, x, "k3"), torch.zeros(100))
    assert (kl_estimate(x, torch.randn(100), "k3") >= 0).all()


def test_k3_is_unbiased_for_the_true_kl():
    # Sample from p, average k3: converges to KL(p || q) = sum p log(p / q).
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    true_kl = (p * (p / q).log()).sum().item()
    idx = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    est = kl_estimate(p.log()[idx], q.log()[idx], "k3").mean().item()
    assert est == pytest.approx(true_kl, rel=0.02)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k9")


def test_policy_loss_by_hand():
    # token 0: ratio 1.5, A = +2: unclipped 3.0, clipped 1.2 * 2 = 2.4 -> loss -2.4, clipped
    # token 1: ratio 0.5, A = -1: unclipped -0.5, clipped 0.8 * -1 = -0.8 -> min -0.8 -> loss 0.8, clipped
    # token 2: ratio 1.1, A = +1: inside the range -> loss -1.1, not clipped
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[2.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    loss, clipped = policy_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=0.2)
    assert loss.tolist()[0] == pytest.approx([-2.4, 0.8, -1.1])
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]


def test_clip_higher_widens_only_the_upper_bound():
    # ratio 1.25, A = +1: eps_high 0.28 leaves it unclipped (loss -1.25); ratio 0.7, A = -1 still clips at 0.8
    logp = torch.tensor([[math.log(1.25), math.log(0.7)]])
    loss, clipped = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.25, 0.8])
    assert clipped.tolist() == [[0.0, 1.0]]


def test_cispo_by_hand():
    # token 0: ratio 1.5, A = +2, cap 1.28: weight 1.28 (detached) -> loss -1.28 * 2 * log 1.5, gradient -2.56;
    #          capped with A > 0, so it counts as clipped
    # token 1: ratio 0.5, A = -1: no lower bound, weight 0.5 -> loss 0.5 * log 0.5, gradient +0.5 (PPO's clip
    #          would have stopped this gradient: 0.5 < 1 - 0.2 with A < 0)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    loss, capped = cispo_loss(logp, torch.zeros(1, 2), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), cap=1.28)
    assert loss.tolist()[0] == pytest.approx([-2.56 * math.log(1.5), 0.5 * math.log(0.5)])
    loss.sum().backward()
    assert logp.grad.tolist()[0] == pytest.approx([-2.56, 0.5])
    assert capped.tolist() == [[1.0, 0.0]]


def test_sequence_advantage_broadcasts_over_tokens():
    loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, -2.0]), torch.ones(2, 3), 0.2, 0.2)
    assert loss.tolist() == [[-1.0] * 3, [2.0] * 3]


def test_aggregation_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 4) / 3 tokens = 7/3
    assert aggregate(loss, mask, "token-mean", token_normalizer(mask, "token-mean")).item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: mean(1.5, 4.0) = 2.75
    norm = token_normalizer(mask, "seq-mean-token-mean")
    assert aggregate(loss, mask, "seq-mean-token-mean", norm).item() == pytest.approx(2.75)
    # Dr.GRPO's constant: (1 + 2 + 4) / (2 sequences x a budget of 4 tokens) = 7/8, whatever the lengths
    norm = token_normalizer(mask, "seq-mean-token-sum-norm", max_tokens=4)
    assert norm.item() == 8.0
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", norm).item() == pytest.approx(7 / 8)


def test_dr_grpo_normalizer_needs_the_generation_budget():
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        token_normalizer(torch.ones(2, 3), "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        token_normalizer(torch.ones(2, 3), "seq-sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_batches_sum_to_the_full_batch(mode):
    # With a global normaliser, the parts of any row split add up to the whole (micro-batches, ranks).
    g = torch.Generator().manual_seed(0)
    loss, mask = torch.randn(6, 5, generator=g), (torch.rand(6, 5, generator=g) > 0.3).float()
    norm = token_normalizer(mask, mode, max_tokens=5)
    whole = aggregate(loss, mask, mode, norm)
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, norm) for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(whole.item())


def test_sft_loss_ignores_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert sft_loss(logp, mask, mask.sum()).item() == pytest.approx(1.5)  # (1 + 2) / 2


def test_dpo_losses_by_hand():
    # h = (chosen - ref_chosen) - (rejected - ref_rejected) = (-1 + 2) - (-3 + 2) = 2
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    loss, margin = dpo_loss(*args, beta=0.5, kind="sigmoid")
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))  # -log sigmoid(0.5 * 2) = 0.313262
    assert margin.item() == pytest.approx(1.0)
    loss, _ = dpo_loss(*args, beta=0.5, kind="ipo")
    assert loss.item() == pytest.approx(1.0)  # (2 - 1 / (2 * 0.5))^2
    # length-normalised (the IPO authors' and TRL's IPO): chosen log-ratio 1 over 2 tokens, rejected -1 over 4:
    # h = 0.5 + 0.25 = 0.75 -> (0.75 - 1)^2 = 0.0625, margin 0.5 * 0.75
    loss, margin = dpo_loss(*args, beta=0.5, kind="ipo", lengths=(torch.tensor([2.0]), torch.tensor([4.0])))
    assert loss.item() == pytest.approx(0.0625) and margin.item() == pytest.approx(0.375)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    loss.sum().backward()
    # d/dh -log sigmoid(beta h) at h = 0 is -beta / 2 = -0.05
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_value_loss_by_hand():
    from rlkit.training.losses import value_loss

    # token 0: v 1.5, v_old 1.0, R 2.0, clip 0.2 -> clipped v 1.2; errors 0.25 vs 0.64 -> 0.5 * 0.64 = 0.32
    # token 1: v 1.1, v_old 1.0, R 0.0 -> inside the clip; errors 1.21 and 1.21 -> 0.605
    values, old, ret = torch.tensor([[1.5, 1.1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2)
    loss, clipped = value_loss(values, old, ret, mask, clip=0.2, normalizer=2.0)
    assert loss.item() == pytest.approx((0.32 + 0.605) / 2)
    assert clipped.tolist() == [[1.0, 0.0]]


def test_sequence_log_ratio_is_the_mean_over_response_tokens():
    from rlkit.training.losses import sequence_log_ratio

    # row 0: (0.2 + 0.4) / 2 = 0.3 (third token masked); row 1: no tokens -> 0
    logp = torch.tensor([[0.2, 0.4, 9.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert sequence_log_ratio(logp, torch.zeros(2, 3), mask).tolist() == pytest.approx([0.3, 0.0])


def test_stats_of_two_parts_add_up_and_policy_stats_log_per_token_means():
    # two micro-batches (or ranks) of 2 and 6 tokens; each loss already divided by the step's normaliser
    a = PolicyStats(loss=0.5, tokens=2.0, entropy=1.0, clipped=1.0, approx_kl=0.02, rollout_kl=0.0, kl=0.2)
    b = PolicyStats(loss=0.25, tokens=6.0, entropy=3.0, clipped=0.0, approx_kl=0.06, rollout_kl=0.08, kl=0.6)
    total = a + b  # 8 tokens: entropy 4/8, clipped 1/8, approx_kl 0.08/8, rollout_kl 0.08/8, kl 0.8/8
    assert total.metrics() == pytest.approx(
        {"loss": 0.75, "entropy": 0.5, "clip_fraction": 0.125, "approx_kl": 0.01, "rollout_kl": 0.01, "kl": 0.1})
    no_ref = PolicyStats(0.5, 2.0, 1.0, 1.0, 0.02, 0.0) + PolicyStats(0.25, 6.0, 3.0, 0.0, 0.06, 0.08)
    assert "kl" not in no_ref.metrics()  # no reference model, no KL to log
    assert (DPOStats(0.5, 1.0, 0.5, 2.0) + DPOStats(0.25, 0.5, 0.5, 1.0)).metrics() == {
        "loss": 0.75, "reward_margin": 1.5, "pair_accuracy": 1.0, "chosen_nll": 3.0}


def test_ranks_updates_merge_into_the_steps():
    ranks = [Update(SFTStats(0.5), grad_norm=2.0, lr=0.1, compile_seconds=3.0),
             Update(SFTStats(0.25), grad_norm=2.0, lr=0.1, compile_seconds=1.0)]
    merged = Update.merge(ranks)  # stats summed, the optimizer's values shared, compile time the ranks' mean
    assert merged.metrics() == {"loss": 0.75, "grad_norm": 2.0, "lr": 0.1, "perf/compile_seconds": 2.0}
    assert "perf/compile_seconds" not in Update.merge([Update(SFTStats(0.5), 1.0, 0.1)]).metrics()


def test_sft_and_dpo_losses_on_hand_made_log_probs():
    # SFT: response tokens -1 and -3 of 4 in the step batch -> (1 + 3) / 4
    out = Forward(torch.tensor([[0.0, -1.0, -3.0]]), None)
    tokens = SimpleNamespace(response_mask=torch.tensor([[0.0, 1.0, 1.0]]))
    loss, stats = SFTLoss()(out, SimpleNamespace(tokens=tokens, normalizer=4.0))
    assert float(loss) == stats.loss == 1.0
    # DPO, one pair of 2-token responses, beta 1: h = (-2 - -3) - (-4 - -4) = 1, loss -log sigmoid(1); NLL 2 / 2
    out = Forward(torch.tensor([[-1.0, -1.0], [-2.0, -2.0]]), None)
    batch = SimpleNamespace(tokens=SimpleNamespace(response_mask=torch.ones(2, 2)), ref_logps=torch.tensor([-3.0, -4.0]),
                            num_pairs=2)
    loss, stats = DPOLoss(beta=1.0, nll_coef=0.5)(out, batch)
    expected = (math.log1p(math.exp(-1.0)) + 0.5 * 1.0) / 2
    assert float(loss) == pytest.approx(expected) and stats.loss == pytest.approx(expected)
    assert stats.reward_margin == pytest.approx(0.5) and stats.pair_accuracy == 0.5 and stats.chosen_nll == 0.5
