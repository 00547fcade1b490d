"""Triton kernels against the torch reference paths.

On a CUDA machine `TestTritonKernels` runs in-process on the GPU. Elsewhere `test_kernels_under_interpreter`
runs this file again in a subprocess with TRITON_INTERPRET=1 (which must be set before triton is imported, and
this pytest process may already have imported it), where the class runs on CPU tensors with tiny shapes.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlkit.kernels import fused_logprobs, gae, reverse_scan

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[2]


def reference(hidden, weight, targets, temperature=1.0):
    logp = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    valid = targets != -100
    return logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid, -(logp.exp() * logp).sum(-1) * valid


def inputs(n, h, v, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    return hidden, weight, targets.to(DEVICE)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(not (CUDA or INTERPRET), reason="no CUDA: test_kernels_under_interpreter runs these instead")
class TestTritonKernels:
    # odd sizes everywhere: N, V, H not multiples of any block; V spans several tiles and H several K steps
    @pytest.mark.parametrize("n, h, v, temperature", [(37, 24, 50, 1.0), (5, 40, 97, 0.6), (1, 16, 17, 2.0)])
    def test_forward_matches_float64_reference(self, n, h, v, temperature):
        hidden, weight, targets = inputs(n, h, v, torch.float32, seed=n + v)
        lp, ent = fused_logprobs(hidden, weight, targets, temperature, return_entropy=True, impl="triton")
        ref_lp, ref_ent = reference(hidden.cpu(), weight.cpu(), targets.cpu(), temperature)
        assert lp.dtype == ent.dtype == torch.float32
        assert torch.allclose(lp.cpu().double(), ref_lp, atol=1e-5)
        assert torch.allclose(ent.cpu().double(), ref_ent, atol=1e-5)
        assert (lp[::4] == 0).all() and (ent[::4] == 0).all()

    def test_vocabulary_slices_merge(self, monkeypatch):
        from rlkit.kernels import _triton_logprobs as tk

        monkeypatch.setattr(tk, "SPLIT_MIN_COLS", 16)  # V = 75 -> several slices, each a partial lse
        hidden, weight, targets = inputs(21, 16, 75, torch.float32, seed=1)
        assert tk._splits(21, 75, hidden.device)[0] > 1
        lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
        ref_lp, ref_ent = reference(hidden.cpu(), weight.cpu(), targets.cpu())
        assert torch.allclose(lp.cpu().double(), ref_lp, atol=1e-5)
        assert torch.allclose(ent.cpu().double(), ref_ent, atol=1e-5)

    @pytest.mark.parametrize("scale", [1e4, -1e4])
    def test_extreme_and_all_negative_logits(self, scale):
        # logits of order +-1e4 (and, at -1e4, the target logits far below the max)
        hidden, weight, targets = inputs(19, 16, 40, torch.float32, seed=2)
        hidden = hidden.sign() * abs(scale)
        weight = -weight.abs() if scale < 0 else weight
        lp, ent = fused_logprobs(hidden, weight, targets, return_entropy=True, impl="triton")
        ref_lp, ref_ent = reference(hidden.cpu(), weight.cpu(), targets.cpu())
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
        assert torch.allclose(lp.cpu().double(), ref_lp, rtol=1e-5, atol=2e-3)  # float32 ulp at 1e4 is ~1e-3
        assert torch.allclose(ent.cpu().double(), ref_ent, atol=1e-4)

    @pytest.mark.parametrize("with_entropy", [True, False])
    def test_gradients_match_torch_path(self, monkeypatch, with_entropy):
        from rlkit.kernels import _triton_logprobs as tk

        monkeypatch.setattr(tk, "DLOGITS_BYTES", 29 * 16 * 4)  # 16-column chunks: V = 53 takes four
        hidden, weight, targets = inputs(29, 24, 53, torch.float32, seed=3)
        coef = torch.randn(29, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        grads = []
        for impl in ("triton", "torch"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            lp, ent = fused_logprobs(h, w, targets, 0.8, return_entropy=with_entropy, impl=impl)
            loss = (lp * coef).sum() + (ent.square().sum() if with_entropy else 0)
            grads.append(torch.autograd.grad(loss, (h, w)))
        for got, want in zip(grads[0], grads[1]):
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    def test_bfloat16_no_less_accurate_than_autograd(self):
        # yardstick: plain autograd through bf16 logits (what fused_logprobs replaces), errors vs float64
        hidden, weight, targets = inputs(33, 32, 70, torch.bfloat16, seed=4)
        valid = targets != -100

        def naive(h, w):
            logp = torch.log_softmax((h @ w.T).float(), -1)
            return logp.gather(1, targets.clamp(min=0)[:, None])[:, 0] * valid, -(logp.exp() * logp).sum(-1) * valid

        def run(f, h, w):
            h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
            lp, ent = f(h, w)
            grads = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
            assert all(g.dtype == h.dtype for g in grads)
            return (lp.detach().cpu().double(), *(g.cpu().double() for g in grads))

        ours = run(lambda h, w: fused_logprobs(h, w, targets, return_entropy=True, impl="triton"), hidden, weight)
        base = run(naive, hidden, weight)
        exact = run(lambda h, w: reference(h, w, targets.cpu()), hidden.cpu().double(), weight.cpu().double())
        assert (ours[0] - exact[0]).abs().max() < 1e-4  # float32 logits of bf16 values, not bf16 logits
        for got, yardstick, want in zip(ours[1:], base[1:], exact[1:]):
            assert (got - want).abs().max() <= 1.5 * (yardstick - want).abs().max() + 1e-3

    def test_frozen_weight_gets_no_gradient_work(self):
        hidden, weight, targets = inputs(18, 16, 33, torch.float32, seed=5)
        h = hidden.clone().requires_grad_()
        lp, _ = fused_logprobs(h, weight, targets, impl="triton")
        (g,) = torch.autograd.grad(lp.sum(), h)
        h2 = hidden.clone().requires_grad_()
        (want,) = torch.autograd.grad(fused_logprobs(h2, weight, targets, impl="torch")[0].sum(), h2)
        assert torch.allclose(g, want, atol=1e-5) and (g[::4] == 0).all()

    def test_empty_batch(self):
        hidden, weight, targets = inputs(0, 16, 20, torch.float32, seed=6)
        h = hidden.clone().requires_grad_()
        lp, ent = fused_logprobs(h, weight, targets, return_entropy=True, impl="triton")
        assert lp.shape == ent.shape == (0,)
        (lp.sum() + ent.sum()).backward()
        assert h.grad.shape == (0, 16)

    @pytest.mark.parametrize("t", [1, 15, 16, 100])
    def test_reverse_scan_matches_chunked_torch_scan(self, t):
        g = torch.Generator().manual_seed(t)
        x, decay = torch.randn(3, t, generator=g), torch.rand(3, t, generator=g)
        decay[:, ::7] = 0.0  # episode boundaries
        got = reverse_scan(x.to(DEVICE), decay.to(DEVICE), impl="triton").cpu()
        assert torch.allclose(got, reverse_scan(x, decay, impl="torch"), atol=1e-5)

    def test_gae_through_the_triton_scan(self, monkeypatch):
        from rlkit.kernels import _triton_scan

        g = torch.Generator().manual_seed(9)
        rewards, values = torch.randn(4, 2100, generator=g), torch.randn(4, 2100, generator=g)
        mask = (torch.arange(2100) < torch.tensor([[0], [5], [1500], [2100]])).float()
        want = gae(rewards, values, mask, 0.99, 0.95, impl="torch")
        got = gae(rewards.to(DEVICE), values.to(DEVICE), mask.to(DEVICE), 0.99, 0.95, impl="triton")
        for a, b in zip(got, want):  # 2100 steps: three 1024-wide blocks and two carries
            assert torch.allclose(a.cpu(), b, atol=1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(CUDA or INTERPRET, reason="TestTritonKernels runs in this process")
def test_kernels_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, str(Path(__file__).with_name("_interpreter_probe.py"))],
                           env=env, capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"triton cannot run kernels in interpreter mode here: {probe.stderr.strip()[-300:]}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::TestTritonKernels"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-2000:]  # all ran, none skipped
