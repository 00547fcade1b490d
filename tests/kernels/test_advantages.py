"""Advantage estimators against hand-worked numbers and step-by-step loop references."""

import pytest
import torch

from rlkit.kernels import discounted_returns, gae, group_normalize, reverse_scan, rloo_advantages


def test_group_normalize_by_hand():
    # group [1, 2, 3]: mean 2, population std sqrt(2/3) = 0.816497 -> [-1.224745, 0, 1.224745]
    # group [5, 5, 5]: zero variance -> all zeros (no signal, no NaN)
    adv = group_normalize(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    assert adv.tolist() == pytest.approx([-1.224745, 0.0, 1.224745, 0.0, 0.0, 0.0], abs=1e-5)
    # Dr.GRPO: centred only
    assert group_normalize(torch.tensor([1.0, 2.0, 3.0]), 3, scale=False).tolist() == [-1.0, 0.0, 1.0]


def test_rloo_by_hand():
    # [1, 0, 0, 1]: others' means [1/3, 2/3, 2/3, 1/3] -> [2/3, -2/3, -2/3, 2/3]
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_left_out_samples_leave_their_group_by_hand():
    valid = torch.tensor([True, True, False, True, True, False, True, True, False, False, True, False])
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 4.0, 1.0, 0.0, 0.0, 3.0, 0.0])
    # group 0 [1, 1, -, 1]: uniform once the placeholder 0 is out -> zeros (counted in: 0.577, 0.577, -1.732, 0.577)
    # group 1 [1, -, 4, 1]: mean 2, population std sqrt(2) -> [-0.707107, 0, 1.414214, -0.707107]
    # group 2 [-, -, 3, -]: one valid sample, nothing to compare -> zeros
    adv = group_normalize(rewards, 4, valid=valid)
    assert adv.tolist() == pytest.approx([0, 0, 0, 0, -0.707107, 0, 1.414214, -0.707107, 0, 0, 0, 0], abs=1e-5)
    assert group_normalize(rewards, 4, scale=False, valid=valid)[4:8].tolist() == [-1.0, 0.0, 2.0, -1.0]
    # RLOO: group 1's baselines are the means of the other two valid rewards: [2.5, -, 1, 2.5] -> [-1.5, 0, 3, -1.5]
    assert rloo_advantages(rewards, 4, valid).tolist() == [0, 0, 0, 0, -1.5, 0, 3.0, -1.5, 0, 0, 0, 0]


def test_an_all_valid_mask_changes_nothing():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(24, generator=g)
    ones = torch.ones(24, dtype=torch.bool)
    assert torch.equal(group_normalize(rewards, 4, valid=ones), group_normalize(rewards, 4))
    assert torch.equal(rloo_advantages(rewards, 4, ones), rloo_advantages(rewards, 4))
    # the masked reductions agree with the plain ones on groups with nothing left out
    some = ones.clone()
    some[1] = False
    assert torch.allclose(group_normalize(rewards, 4, valid=some)[4:], group_normalize(rewards, 4)[4:], atol=1e-6)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="groups of 4"):
        group_normalize(torch.zeros(6), 4)


def test_discounted_returns_by_hand():
    # rewards [0, 0, 1] on tokens 1..3 of 4, gamma 0.5: G = [0, 0.25, 0.5, 1], position 0 masked out
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert discounted_returns(rewards, mask, 0.5).tolist() == [[0.0, 0.25, 0.5, 1.0]]


def test_gae_by_hand():
    # two tokens, r = [0, 1], V = [0.5, 0.2], gamma 1, lambda 0.5
    # delta_1 = 1 + 0 - 0.2 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3
    # A_1 = 0.8; A_0 = -0.3 + 0.5 * 0.8 = 0.1; returns = A + V = [0.6, 1.0]
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([0.1, 0.8])
    assert ret.tolist()[0] == pytest.approx([0.6, 1.0])


def loop_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        last = 0.0
        for j in reversed(range(t)):
            if mask[i, j] == 0:
                last = 0.0 if (j + 1 >= t or mask[i, j + 1] == 0) else last
                continue
            nxt = values[i, j + 1].item() if j + 1 < t and mask[i, j + 1] else 0.0
            cont = 1.0 if j + 1 < t and mask[i, j + 1] else 0.0
            delta = rewards[i, j].item() + gamma * nxt - values[i, j].item()
            last = delta + gamma * lam * cont * last
            adv[i, j] = last
    return adv


@pytest.mark.parametrize("t", [1, 63, 64, 65, 200])
def test_chunked_gae_matches_a_step_loop(t):
    g = torch.Generator().manual_seed(t)
    b = 5
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.zeros(b, t)
    for i in range(b):  # a response span per row, of random start and length (one row empty)
        start = int(torch.randint(0, t, (1,), generator=g))
        length = 0 if i == 0 else int(torch.randint(1, t - start + 1, (1,), generator=g))
        mask[i, start : start + length] = 1
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    expected = loop_gae(rewards.double(), (values * mask).double(), mask, 0.99, 0.95)
    assert torch.allclose(adv.double(), expected, atol=1e-5)
    assert torch.allclose(ret, (adv + values * mask) * mask)


def test_reverse_scan_with_zero_decays_and_long_sequences():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 300, generator=g, dtype=torch.float64)
    decay = torch.rand(3, 300, generator=g, dtype=torch.float64)
    decay[:, ::17] = 0.0
    expected = torch.zeros_like(x)
    acc = torch.zeros(3, dtype=torch.float64)
    for j in reversed(range(300)):
        nxt = decay[:, j] * acc
        acc = x[:, j] + nxt
        expected[:, j] = acc
    assert torch.allclose(reverse_scan(x, decay, chunk=64), expected, atol=1e-10)


def random_spans(b, t, g):
    """A (b, t) mask with one response span per row at a random start and length; row 0 is empty."""
    mask = torch.zeros(b, t)
    for i in range(1, b):
        start = int(torch.randint(0, t, (1,), generator=g))
        mask[i, start : start + int(torch.randint(1, t - start + 1, (1,), generator=g))] = 1
    return mask


@pytest.mark.parametrize("t", [1, 64, 130, 257])
def test_chunked_discounted_returns_match_a_step_loop(t):
    g = torch.Generator().manual_seed(100 + t)
    rewards, mask = torch.randn(4, t, generator=g), random_spans(4, t, g)
    expected = torch.zeros(4, t)
    for i in range(4):
        acc = 0.0
        for j in reversed(range(t)):
            acc = rewards[i, j].item() + 0.97 * acc if mask[i, j] else 0.0
            expected[i, j] = acc
    assert torch.allclose(discounted_returns(rewards, mask, 0.97), expected, atol=1e-5)


def test_gae_limits_lambda_one_and_zero():
    # lambda = 1: A_t = G_t - V_t (Monte Carlo); lambda = 0: A_t = delta_t (one-step TD)
    g = torch.Generator().manual_seed(8)
    rewards, values, mask = torch.randn(3, 150, generator=g), torch.randn(3, 150, generator=g), random_spans(3, 150, g)
    adv, _ = gae(rewards, values, mask, 0.9, 1.0)
    assert torch.allclose(adv, discounted_returns(rewards, mask, 0.9) - values * mask, atol=1e-5)
    adv, _ = gae(rewards, values, mask, 0.9, 0.0)
    v = values * mask
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1)], 1)
    assert torch.allclose(adv, (rewards + 0.9 * next_v - v) * mask, atol=1e-6)


def test_gae_with_discount_by_hand():
    # three tokens, the last masked out: r = [1, 2, (5)], V = [0.5, 1.0, (9)], gamma 0.5, lambda 0.5
    # the masked token is past the end: V_2 counts as 0, so delta_1 = 2 + 0 - 1 = 1, delta_0 = 1 + 0.5*1 - 0.5 = 1
    # A_1 = 1; A_0 = 1 + 0.25 * 1 = 1.25; returns = A + V = [1.75, 2.0, 0]
    rewards, values, mask = torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[0.5, 1.0, 9.0]]), torch.tensor([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, 0.5, 0.5)
    assert adv.tolist()[0] == pytest.approx([1.25, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.75, 2.0, 0.0])


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="1-D"):
        group_normalize(torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="one \\(B, T\\) shape"):
        gae(torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(2, 5), 1.0, 0.95)
    with pytest.raises(ValueError, match="one \\(B, T\\) shape"):
        discounted_returns(torch.zeros(5), torch.ones(5), 1.0)
    with pytest.raises(ValueError, match="impl"):
        reverse_scan(torch.zeros(1, 3), torch.zeros(1, 3), impl="cuda")
