"""fused_logprobs against a float64 reference that materialises the logits."""

import pytest
import torch

from rlkit.kernels import fused_logprobs


def reference(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    logits = (hidden.double() @ weight.double().T) / temperature
    logp = torch.log_softmax(logits, -1)
    valid = targets != ignore_index
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return lp, ent


@pytest.mark.parametrize("n, h, v, chunk", [(1, 3, 2, None), (37, 16, 101, 5), (64, 8, 7, 64), (13, 24, 1001, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_matches_float64_reference(n, h, v, chunk, temperature):
    g = torch.Generator().manual_seed(n * v)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::3] = -100
    lp, ent = fused_logprobs(hidden, weight, targets, temperature, return_entropy=True, chunk_size=chunk, impl="torch")
    ref_lp, ref_ent = reference(hidden, weight, targets, temperature)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)
    assert (lp[::3] == 0).all() and (ent[::3] == 0).all()


def test_leading_dims_and_no_entropy_by_default():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(9, 4)
    targets = torch.randint(0, 9, (2, 3))
    lp, ent = fused_logprobs(hidden, weight, targets)
    assert lp.shape == (2, 3) and ent is None
    assert torch.equal(fused_logprobs(hidden, weight, targets.int())[0], lp)  # int32 targets work too


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_and_all_negative_logits(scale):
    # logits of magnitude ~1e4 overflow a naive exp; the log-sum-exp must stay finite and exact
    hidden = torch.ones(4, 2, dtype=torch.float64) * scale
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3])
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=3)
    ref_lp, ref_ent = reference(hidden, weight, targets)
    assert torch.isfinite(lp).all() and torch.allclose(lp, ref_lp) and torch.allclose(ent, ref_ent)


def test_one_hot_and_uniform_distributions():
    v = 10
    weight = torch.eye(v, dtype=torch.float64)
    onehot = torch.zeros(1, v, dtype=torch.float64)
    onehot[0, 4] = 1e4  # all mass on token 4
    lp, ent = fused_logprobs(onehot, weight, torch.tensor([4]), return_entropy=True)
    assert lp.item() == pytest.approx(0.0, abs=1e-12) and ent.item() == pytest.approx(0.0, abs=1e-9)
    uniform = torch.zeros(1, v, dtype=torch.float64)
    lp, ent = fused_logprobs(uniform, weight, torch.tensor([7]), return_entropy=True)
    assert lp.item() == pytest.approx(-torch.log(torch.tensor(10.0)).item())
    assert ent.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())


def test_gradcheck_logprobs_and_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.tensor([0, 5, -100, 2, 3, 1, 4])

    def f(h, w):
        lp, ent = fused_logprobs(h, w, targets, temperature=0.8, return_entropy=True, chunk_size=3, impl="torch")
        return lp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight))


def test_gradients_match_the_reference_in_float32():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(33, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (33,), generator=g)
    coef = torch.randn(33, generator=g)
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=8)
    ((lp * coef).sum() + ent.sum()).backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    rlp, rent = reference(h2, w2, targets)
    ((rlp * coef.double()).sum() + rent.sum()).backward()
    assert torch.allclose(hidden.grad.double(), h2.grad, atol=1e-4)
    assert torch.allclose(weight.grad.double(), w2.grad, atol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="leading dims"):
        fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size"):
        fused_logprobs(torch.randn(3, 4), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="impl"):
        fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long), impl="cuda")


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_in_float32(scale):
    # logits [s, s, -s, s]: at s = 1e4 three tokens tie (log 3 entropy); at s = -1e4 token 2 takes all the mass.
    # Entropy as lse - sum(p z) would lose ~1e4 * 6e-8 here to cancellation; -sum(p log p) does not.
    hidden = torch.full((4, 2), scale)
    weight = torch.tensor([[1.0, 0.0], [0.5, 0.5], [-1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 2, 3])
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=3)
    ref_lp, ref_ent = reference(hidden, weight, targets)
    # log p = z - lse with both near 1e4: float32 resolves them to ulp(1e4) ~ 1e-3, the best float32 can do
    assert torch.isfinite(lp).all() and torch.allclose(lp.double(), ref_lp, atol=2e-3)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-6)


def test_all_negative_logits_large_vocab():
    # every logit far below zero: a naive exp underflows to 0 and log(0) = -inf
    g = torch.Generator().manual_seed(3)
    hidden = torch.rand(9, 6, generator=g) + 1.0
    weight = -(torch.rand(257, 6, generator=g) + 1.0) * 300.0
    targets = torch.randint(0, 257, (9,), generator=g)
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=4)
    ref_lp, ref_ent = reference(hidden, weight, targets)
    assert torch.isfinite(lp).all() and torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-3)
    assert torch.allclose(ent.double(), ref_ent, atol=1e-4)


def test_bfloat16_inputs_get_float32_logits():
    # the reference sees the same bf16 values in float64: float32 logits leave only float32 rounding, where a
    # bf16 GEMM output would be off by ~|logit| * 2^-9
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(19, 32, generator=g).bfloat16(), torch.randn(77, 32, generator=g).bfloat16()
    targets = torch.randint(0, 77, (19,), generator=g)
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=6)
    ref_lp, ref_ent = reference(hidden, weight, targets)
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref_lp, atol=1e-5) and torch.allclose(ent.double(), ref_ent, atol=1e-5)


def test_bfloat16_gradients_have_input_dtypes():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(10, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(21, 16, generator=g).bfloat16().requires_grad_()
    targets = torch.randint(0, 21, (10,), generator=g)
    lp, _ = fused_logprobs(hidden, weight, targets, chunk_size=4)
    lp.sum().backward()
    h2, w2 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference(h2, w2, targets)[0].sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert torch.allclose(hidden.grad.double(), h2.grad, rtol=2e-2, atol=2e-3)
    assert torch.allclose(weight.grad.double(), w2.grad, rtol=2e-2, atol=2e-3)


def test_ignored_positions_get_no_gradient_and_frozen_weight_is_skipped():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 5, generator=g, requires_grad=True)
    weight = torch.randn(9, 5, generator=g)  # frozen LM head: only hidden needs a gradient
    targets = torch.tensor([1, -100, 2, -100, 8, 0])
    lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad[1] == 0).all() and (hidden.grad[3] == 0).all() and (hidden.grad[0] != 0).any()


def test_logprobs_only_backward_matches_reference():
    # return_entropy=False skips the entropy work; the log-prob gradient is unchanged
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (11,), generator=g)
    assert torch.autograd.gradcheck(
        lambda h, w: fused_logprobs(h, w, targets, temperature=1.3, chunk_size=4, impl="torch")[0], (hidden, weight)
    )


def test_choice_is_logged_once(caplog):
    from rlkit.kernels import _dispatch

    _dispatch._logged.discard(("fused_logprobs", "torch"))
    h, w, t = torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1])
    with caplog.at_level("INFO", logger="rlkit.kernels"):
        fused_logprobs(h, w, t)
        fused_logprobs(h, w, t)
    assert [r.getMessage() for r in caplog.records] == ["fused_logprobs: using the torch implementation"]


def test_triton_on_cpu_tensors_is_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        fused_logprobs(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), impl="triton")
    with pytest.raises(ValueError, match="float64"):
        fused_logprobs(torch.randn(2, 3).double(), torch.randn(4, 3).double(), torch.tensor([0, 1]), impl="triton")


def test_empty_batch():
    hidden = torch.zeros(2, 0, 4, requires_grad=True)
    lp, ent = fused_logprobs(hidden, torch.randn(5, 4), torch.zeros(2, 0, dtype=torch.long), return_entropy=True)
    assert lp.shape == ent.shape == (2, 0)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == (2, 0, 4)
