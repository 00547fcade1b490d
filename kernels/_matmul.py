"""Matrix products with float32 accumulation *and* float32 results for half-precision operands.

A plain bf16 GEMM accumulates in float32 but rounds its output to bf16, which costs log-probs ~|logit| * 2^-9
(about 0.05 nats at logit 20). CUDA has `torch.mm(..., out_dtype=torch.float32)`; CPU does not, so there the
operands are upcast (CPU half precision is not a training target, only correctness matters there).
"""

from __future__ import annotations

import functools

import torch

_HALF = (torch.float16, torch.bfloat16)
_ROW_BLOCK_BYTES = 64 * 2**20  # float32 temporaries of the fallback accumulate stay below this


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) @ b (k, n) -> (m, n) in float32 (float64 if either is float64)."""
    if a.dtype != b.dtype or a.dtype not in _HALF:
        dt = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        return a.to(dt) @ b.to(dt)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc (m, n) float32 += a (m, k) @ b (k, n), accumulating in float32 whatever the operands' dtype."""
    if a.dtype == b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _HALF:
        if _cuda_addmm_takes_float32_input():
            return torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        # mm(out_dtype) then add, a block of rows at a time so the float32 temporary stays small
        rows = max(1, _ROW_BLOCK_BYTES // (4 * acc.shape[1]))
        for r in range(0, acc.shape[0], rows):
            acc[r : r + rows] += torch.mm(a[r : r + rows], b, out_dtype=acc.dtype)
        return acc
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@functools.cache
def _cuda_addmm_takes_float32_input() -> bool:
    # Some torch versions accept addmm(fp32 acc, bf16, bf16, out_dtype=fp32), others require acc in bf16.
    try:
        acc = torch.ones(16, 16, device="cuda")
        ones = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
        return bool((acc == 17).all())
    except (RuntimeError, TypeError):
        return False
