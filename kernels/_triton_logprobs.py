"""Triton path of `rlkit.kernels.logprobs.fused_logprobs` (imported only there, for CUDA tensors or under the interpreter).

Forward, one kernel: each program takes BLOCK_N tokens and one slice of the vocabulary, computes logit tiles
with `tl.dot` (bf16 operands, float32 accumulation) and folds them into an online log-sum-exp, the target's
logit and the entropy's sum, then a few (S, N) partials are merged in torch. Splitting the vocabulary keeps
the GPU full at small N; programs are ordered in groups of GROUP_N token blocks per slice so that the weight
tiles they stream are shared through L2 instead of re-read from HBM.

Backward, per vocabulary chunk of Cv columns: a kernel recomputes the logits and writes d loss / d logits
(N, Cv) in the operand dtype; cuBLAS then forms grad_weight[chunk] = dlogits^T @ hidden (complete over N, so
rounded once) and grad_hidden += dlogits @ weight[chunk] into an (N, H) float32 accumulator. Why not
accumulate with atomics inside one kernel: that moves ~2 N V H / BLOCK float32 atomics (~0.5 TB at N=16k,
V=152k, H=3584), and a float32 (V, H) accumulator alone is 2.2 GiB. Here the extra memory is the (N, H)
float32 accumulator plus one dlogits chunk (DLOGITS_BYTES); the cost is four GEMMs (one recomputation).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from rlkit.kernels._dispatch import interpreting
from rlkit.kernels._matmul import addmm_f32_

DLOGITS_BYTES = 192 * 2**20  # one backward chunk of dlogits (N, Cv)
SPLIT_MIN_COLS = 2048  # a vocabulary slice is at least this wide, so each program has many tiles to fold
GROUP_N = 16  # token blocks that walk one vocabulary slice together (L2 reuse of its weight tiles)
_INTERPRET = interpreting()
_V_ALIGN = 16 if _INTERPRET else 256  # slices and chunks start on a multiple of every BLOCK_V


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the CPU interpreter: one tiny config, tl.dot needs 16 in every dim
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_H": 16}, num_warps=1)]
    # H100 bf16 tiles with 64-deep K steps and 3-4 cp.async stages. Compiled for sm_90 with ptxas (no GPU
    # here) these fit in 255 registers without spilling; 128x256 tiles spilled in the forward epilogue.
    shapes = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=w, num_stages=s)
        for n, v, h, w, s in shapes
    ]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, s_hn, s_hk, s_wv, s_wk, inv_temp,
                 DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """(BLOCK_N, BLOCK_V) float32 tile of (hidden @ weight.T) / T."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * s_hn + ks[None, :] * s_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * s_wv + ks[:, None] * s_wk, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_F32:  # float32 operands (and the interpreter): exact products, no TF32
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc * inv_temp


@triton.jit
def _grouped(pid, n_blocks, n_other, GROUP: tl.constexpr):
    """Program id -> (token block, other block), GROUP token blocks per step of the other axis."""
    per_group = GROUP * n_other
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_blocks - first, GROUP)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.autotune(configs=_configs(), key=["H", "V"])
@triton.jit
def _forward_kernel(h_ptr, w_ptr, t_ptr, part_ptr, N, V, H, S, v_per_split, s_hn, s_hk, s_wv, s_wk, inv_temp,
                    DOT_F32: tl.constexpr, GROUP_N: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # part (4, S, N): running max m, sum exp(z - m), sum exp(z - m) (z - m), target logit (0 off this slice)
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), S, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    u = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    # flatten: one software-pipelined loop over (vocabulary tile, K step), so the next tile's loads are in
    # flight while this tile's softmax epilogue runs (at H=896 a tile is only 14 K steps)
    for v0 in tl.range(v_lo, v_hi, BLOCK_V, flatten=True):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)  # cols * stride may pass 2^31 at large V * H
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, s_hn, s_hk, s_wv, s_wk, inv_temp,
                         DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))  # finite: every tile has a valid column
        shift = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # <= 0; 0 on padding (where e is 0)
        e = tl.where(col_ok[None, :], tl.exp(shift), 0.0)
        alpha = tl.exp(m - m_new)  # 0 on the first tile
        # u tracks sum e (z - m) relative to the running max, so entropy = log s - u / s never cancels
        u = alpha * (u + tl.where(s > 0, m - m_new, 0.0) * s) + tl.sum(e * shift, 1)
        s = alpha * s + tl.sum(e, 1)
        zt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & col_ok[None, :], z, 0.0), 1)
        m = m_new
    out = part_ptr + pid_s * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + S * N, s, mask=row_ok)
    tl.store(out + 2 * S * N, u, mask=row_ok)
    tl.store(out + 3 * S * N, zt, mask=row_ok)


@triton.autotune(configs=_configs(), key=["H", "V"])
@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dl_ptr, N, V, H, v_lo, cv,
                    s_hn, s_hk, s_wv, s_wk, s_dn, inv_temp, HAS_ENT: tl.constexpr, DOT_F32: tl.constexpr,
                    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    # dl (N, cv) = d loss / d logits for vocabulary columns [v_lo, v_lo + cv); w_ptr points at row v_lo
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(cv, BLOCK_V), GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < N, cols < cv
    rows = rows.to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, s_hn, s_hk, s_wv, s_wk, inv_temp,
                     DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
    logp = z - tl.load(lse_ptr + rows, mask=row_ok, other=0.0)[:, None]
    p = tl.exp(logp)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)[:, None]
    # d logp_t / dz_k = onehot_k(t) - p_k;  d H / dz_k = -p_k (log p_k + H)
    coef = g_lp
    if HAS_ENT:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
        coef = coef + tl.load(gent_ptr + rows, mask=row_ok, other=0.0)[:, None] * (logp + ent)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1) - v_lo
    d = (tl.where(cols[None, :] == tgt[:, None], g_lp, 0.0) - p * coef) * inv_temp
    tl.store(dl_ptr + rows[:, None] * s_dn + cols[None, :], d.to(dl_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _splits(n: int, vocab: int, device: torch.device) -> tuple[int, int]:
    """(S, columns per slice): enough programs for ~4 waves at 128-token blocks, slices >= SPLIT_MIN_COLS."""
    want = triton.cdiv(4 * _num_sms(device), max(1, triton.cdiv(n, 128)))
    s = max(1, min(want, vocab // SPLIT_MIN_COLS))
    per = triton.cdiv(triton.cdiv(vocab, s), _V_ALIGN) * _V_ALIGN
    return triton.cdiv(vocab, per), per


def merge_partials(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """part (4, S, N) of per-slice (max m, sum e^(z-m), sum e^(z-m)(z-m), target logit) -> lse, entropy, logprob."""
    m, s, u, zt = part.unbind(0)
    top = m.max(0).values  # (N,)
    scale = torch.exp(m - top)  # (S, N) rescales each slice to the common max
    s_all = (s * scale).sum(0)
    u_all = (scale * (u + (m - top) * s)).sum(0)
    lse = top + torch.log(s_all)
    return lse, torch.log(s_all) - u_all / s_all, zt.sum(0) - lse


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor):
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dt), weight.to(dt), dt == torch.float32 or _INTERPRET


def _forward(hidden, weight, targets, temperature):
    h, w, dot_f32 = _common_dtype(hidden, weight)
    n, hdim = h.shape
    vocab = w.shape[0]
    s, per = _splits(n, vocab, h.device)
    part = torch.empty(4, s, n, dtype=torch.float32, device=h.device)
    if n:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * s,)  # noqa: E731
        _forward_kernel[grid](h, w, targets, part, n, vocab, hdim, s, per, h.stride(0), h.stride(1),
                              w.stride(0), w.stride(1), 1.0 / temperature, DOT_F32=dot_f32, GROUP_N=GROUP_N)
    return merge_partials(part)


def _backward(hidden, weight, targets, lse, entropy, g_lp, g_ent, temperature, need_h, need_w):
    h, w, dot_f32 = _common_dtype(hidden, weight)
    n, hdim = h.shape
    vocab = w.shape[0]
    if n == 0:
        return torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None
    cv = min(vocab, max(_V_ALIGN, DLOGITS_BYTES // max(1, n * h.element_size()) // _V_ALIGN * _V_ALIGN))
    dl = torch.empty(n, cv, dtype=h.dtype, device=h.device)  # one chunk of dlogits, reused
    grad_h32 = torch.zeros(n, hdim, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.empty_like(w) if need_w else None
    for v0 in range(0, vocab, cv):
        width = min(cv, vocab - v0)
        d, w_chunk = dl[:, :width], w[v0 : v0 + width]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)  # noqa: E731
        _dlogits_kernel[grid](h, w_chunk, targets, lse, entropy, g_lp, g_ent if g_ent is not None else g_lp, d,
                              n, vocab, hdim, v0, width, h.stride(0), h.stride(1), w.stride(0), w.stride(1),
                              d.stride(0), 1.0 / temperature, HAS_ENT=g_ent is not None, DOT_F32=dot_f32,
                              GROUP_N=GROUP_N)
        if need_w:
            torch.mm(d.T, h, out=grad_w[v0 : v0 + width])  # (Cv, H), reduced over all N at once
        if need_h:
            addmm_f32_(grad_h32, d, w_chunk)
    grad_hidden = grad_h32.to(hidden.dtype) if need_h else None
    return grad_hidden, grad_w.to(weight.dtype) if need_w else None


class _TritonLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy):
        lse, entropy, logprobs = _forward(hidden, weight, targets, temperature)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.want_entropy = temperature, want_entropy
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        g_lp = grad_logprobs.float().contiguous() if grad_logprobs is not None else torch.zeros_like(lse)
        g_ent = grad_entropy.float().contiguous() if ctx.want_entropy and grad_entropy is not None else None
        grads = _backward(hidden, weight, targets, lse, entropy, g_lp, g_ent, ctx.temperature,
                          *ctx.needs_input_grad[:2])
        return *grads, None, None, None


def triton_logprobs(hidden, weight, targets, temperature, return_entropy):
    """hidden (N, H), weight (V, H), targets (N,) in [0, V) -> logprobs (N,), entropy (N,) float32."""
    return _TritonLogprobs.apply(hidden, weight, targets.contiguous(), temperature, return_entropy)
