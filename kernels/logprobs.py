"""Per-token log-probs (and entropy) of targets straight from hidden states, never materialising [N, V] logits.

`fused_logprobs` is the one public op. `_torch_impl` processes tokens in chunks: the forward keeps only each
token's log-sum-exp, the backward recomputes a chunk's logits to form its gradient. It runs anywhere and is the
reference for the Triton kernel (`kernels._triton_logprobs`), which `impl="auto"` picks on CUDA.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 2**20  # budget for one chunk's float32 logits (and as much again for its gradient)
_logged_choice: set[str] = set()


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, CHUNK_BYTES // (4 * vocab))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 inputs (exact tests) stay float64; everything else accumulates in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk):
        # hidden (N, H), weight (V, H), targets (N,) -> logprobs (N,), entropy (N,)
        cdt = _compute_dtype(hidden.dtype)
        w = weight.to(cdt)
        n = hidden.shape[0]
        logprobs = torch.zeros(n, dtype=cdt, device=hidden.device)
        entropy = torch.zeros(n, dtype=cdt, device=hidden.device)
        lse_all = torch.zeros(n, dtype=cdt, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = (hidden[rows].to(cdt) @ w.T) / temperature  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            probs = torch.exp(logits - lse[:, None])
            logprobs[rows] = logits.gather(1, safe_targets[rows, None])[:, 0] - lse
            entropy[rows] = lse - (probs * logits).sum(-1)
            lse_all[rows] = lse
        logprobs = logprobs * valid
        entropy = entropy * valid
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse_all, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, valid, lse_all, entropy = ctx.saved_tensors
        cdt = lse_all.dtype
        w = weight.to(cdt)
        grad_hidden = torch.zeros_like(hidden, dtype=cdt) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        g_lp = grad_logprobs.to(cdt) * valid if grad_logprobs is not None else None
        g_h = grad_entropy.to(cdt) * valid if grad_entropy is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows].to(cdt)
            logits = (h @ w.T) / ctx.temperature  # (c, V), recomputed
            probs = torch.exp(logits - lse_all[rows, None])
            grad_logits = torch.zeros_like(logits)
            if g_lp is not None:
                # d logp_target / d z = onehot(target) - p
                grad_logits -= g_lp[rows, None] * probs
                grad_logits.scatter_add_(1, targets[rows, None], g_lp[rows, None])
            if g_h is not None:
                # d H / d z_k = -p_k (log p_k + H) = -p_k (z_k - lse + H)
                log_p = logits - lse_all[rows, None]
                grad_logits -= g_h[rows, None] * probs * (log_p + entropy[rows, None])
            grad_logits /= ctx.temperature
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ w
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h
        grad_hidden = grad_hidden.to(hidden.dtype) if grad_hidden is not None else None
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def _torch_impl(hidden, weight, targets, temperature, ignore_index, chunk_size):
    chunk = _chunk_rows(weight.shape[0], chunk_size)
    return _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), ignore_index, chunk)


def _choose(impl: str, hidden: torch.Tensor) -> str:
    if impl == "auto":
        impl = "torch"
        if hidden.is_cuda:
            try:
                import triton  # noqa: F401

                impl = "triton"
            except ImportError:
                pass
    if impl not in ("torch", "triton"):
        raise ValueError(f"fused_logprobs impl '{impl}' is not one of auto, torch, triton")
    if impl not in _logged_choice:
        _logged_choice.add(impl)
        log.info("fused_logprobs: using the %s implementation", impl)
    return impl


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax((hidden @ weight.T) / temperature)[targets] and, optionally, the entropy of that softmax.

    hidden (..., H), weight (V, H), targets (...) long -> logprobs (...) float32 (float64 for float64 input),
    entropy (...) or None. Positions whose target is `ignore_index` get 0 and no gradient. Differentiable
    in hidden and weight; memory stays O(chunk x V) instead of O(N x V).

    >>> h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> t = torch.tensor([0, 3, -100, 10, 2])
    >>> lp, _ = fused_logprobs(h, w, t)
    >>> ref = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
    >>> bool(torch.allclose(lp, ref))
    True
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on leading dims")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    lead = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if _choose(impl, hidden) == "triton":
        from kernels._triton_logprobs import triton_logprobs

        logprobs, entropy = triton_logprobs(flat_h, weight, flat_t, float(temperature), ignore_index)
    else:
        logprobs, entropy = _torch_impl(flat_h, weight, flat_t, temperature, ignore_index, chunk_size)
    return logprobs.reshape(lead), entropy.reshape(lead) if return_entropy else None
