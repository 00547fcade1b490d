"""Per-token log-probs (and entropy) of targets straight from hidden states, never materialising (N, V) logits.

`fused_logprobs` is the one public op. `_torch_impl` processes tokens in chunks: the forward keeps only each
token's log-sum-exp (and entropy), the backward recomputes a chunk's logits to form its gradient. It runs
anywhere and is the reference for the Triton kernels (`rlkit.kernels._triton_logprobs`), which `impl="auto"` picks
for CUDA tensors.
"""

from __future__ import annotations

import torch

from rlkit.kernels._dispatch import choose_impl
from rlkit.kernels._matmul import addmm_f32_, mm_f32

# Budget for one chunk's float32 logits. Forward and backward each hold about 2.5 buffers of this size.
CHUNK_BYTES = 128 * 2**20
# ...within these many rows: fewer make the chunk GEMMs inefficient, more leave the chunk's logits out of cache
# between the GEMM and the softmax. `python bench/kernels.py --cpu` (2-core CPU, float32, forward + backward), against
# CHUNK_BYTES alone: 0.83x the time at V=2048 (2048 -> 1024 rows), 0.87x at V=151936 (220 -> 512 rows).
CHUNK_ROWS = (512, 1024)


def _chunk_rows(vocab: int, chunk_size: int | None) -> int:
    """Tokens per chunk: `chunk_size`, else CHUNK_BYTES of float32 logits kept within CHUNK_ROWS.

    >>> _chunk_rows(2048, None), _chunk_rows(49152, None), _chunk_rows(151936, None), _chunk_rows(8, 3)
    (1024, 682, 512, 3)
    """
    low, high = CHUNK_ROWS
    return chunk_size or min(high, max(low, CHUNK_BYTES // (4 * vocab)))


def _operand_weight(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The weight as the chunk GEMMs take it: itself on CUDA or at full precision, else one upcast copy."""
    # CPU has no half-precision GEMM with a float32 result, and mixed dtypes need a common one: pay one copy
    # per call rather than one per chunk. CUDA takes half-precision weights as they are (rlkit.kernels._matmul).
    if weight.dtype == hidden.dtype and (weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16)):
        return weight
    return weight.to(torch.promote_types(torch.promote_types(weight.dtype, hidden.dtype), torch.float32))


def _chunk_logp(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """h (c, H), weight (V, H) -> logits / temperature, (c, V) float32 (float64 for float64 input)."""
    logits = mm_f32(h, weight.T)
    return logits if temperature == 1.0 else logits.div_(temperature)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, chunk):
        # hidden (N, H), weight (V, H), targets (N,) with ignored positions already mapped to 0, valid (N,)
        w = _operand_weight(weight, hidden)
        n = hidden.shape[0]
        cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        lse, logprobs = (torch.empty(n, dtype=cdt, device=hidden.device) for _ in range(2))
        entropy = torch.zeros(n, dtype=cdt, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logp = _chunk_logp(hidden[rows], w, temperature)  # (c, V) logits
            lse[rows] = torch.logsumexp(logp, dim=-1)
            logp.sub_(lse[rows, None])  # now log-probs
            logprobs[rows] = logp.gather(1, targets[rows, None])[:, 0]
            if want_entropy:
                # -sum p log p, not lse - sum p z: the latter cancels catastrophically at large logits
                entropy[rows] = -logp.exp().mul_(logp).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.want_entropy, ctx.chunk = temperature, want_entropy, chunk
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        w = _operand_weight(weight, hidden)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_w32 = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        g_lp = grad_logprobs.to(lse.dtype) if grad_logprobs is not None else torch.zeros_like(lse)
        g_ent = grad_entropy.to(lse.dtype) if ctx.want_entropy and grad_entropy is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            d = _chunk_dlogits(
                _chunk_logp(h, w, ctx.temperature), targets[rows], lse[rows], entropy[rows],
                g_lp[rows], None if g_ent is None else g_ent[rows], ctx.temperature,
            )
            d = d.to(w.dtype)  # GEMMs in the weight's dtype with float32 accumulation, as autograd's would be
            if need_h:
                grad_hidden[rows] = mm_f32(d, w)
            if need_w:
                addmm_f32_(grad_w32, d.T, h)
        grad_weight = grad_w32.to(weight.dtype) if need_w else None
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_dlogits(logits, targets, lse, entropy, g_lp, g_ent, temperature):
    """d loss / d logits for one chunk, (c, V), overwriting `logits` (c, V); the rest are (c,).

    d logp_t / dz_k = onehot_k(t) - p_k;  d H / dz_k = -p_k (log p_k + H);  then the chain rule through z / T.
    The signs and 1/T go into the (c,) factors, so each (c, V) pass is one the formula needs.
    """
    logp = logits.sub_(lse[:, None])
    p = logp.exp()
    g_lp = g_lp / temperature
    coef = -g_lp[:, None]  # (c, 1)
    if g_ent is not None:  # -(g_lp + g_ent (log p + H)) / T
        coef = logp.add_(entropy[:, None]).mul_(g_ent[:, None] / -temperature).add_(coef)  # (c, V)
    d = p.mul_(coef)
    return d.scatter_add_(1, targets[:, None], g_lp[:, None])


def _torch_impl(hidden, weight, targets, temperature, return_entropy, chunk_size):
    """hidden (N, H), weight (V, H), targets (N,) in [0, V) -> logprobs (N,), entropy (N,)."""
    chunk = _chunk_rows(weight.shape[0], chunk_size)
    return _ChunkedLogprobs.apply(hidden, weight, targets, float(temperature), return_entropy, chunk)


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
    in hidden and weight; memory stays O(chunk x V) instead of O(N x V). `chunk_size` is the token chunk of
    the torch path (default: `_chunk_rows`); `impl` is "auto", "torch" or "triton".

    >>> h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> t = torch.tensor([0, 3, -100, 10, 2])
    >>> lp, _ = fused_logprobs(h, w, t)
    >>> ref = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
    >>> bool(torch.allclose(lp, ref))
    True
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on leading dims")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    triton_ok = hidden.dtype != torch.float64 and weight.dtype != torch.float64
    chosen = choose_impl("fused_logprobs", impl, hidden, triton_ok)
    lead = targets.shape
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    valid = flat_t != ignore_index
    safe_t = torch.where(valid, flat_t, 0).long()  # gather wants int64 indices
    if chosen == "triton":
        from rlkit.kernels._triton_logprobs import triton_logprobs

        logprobs, entropy = triton_logprobs(flat_h, weight, safe_t, float(temperature), return_entropy)
    else:
        logprobs, entropy = _torch_impl(flat_h, weight, safe_t, temperature, return_entropy, chunk_size)
    # masking by multiplication zeroes both the values and their gradients at ignored positions
    logprobs = (logprobs * valid).reshape(lead)
    return logprobs, (entropy * valid).reshape(lead) if return_entropy else None
