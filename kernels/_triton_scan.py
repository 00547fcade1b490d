"""Triton reverse linear scan y_t = x_t + c_t * y_{t+1} (y_T = 0) for GAE and discounted returns.

One program per row walks time backwards in blocks of BLOCK_T: inside a block `tl.associative_scan` composes
the affine maps y -> x_t + c_t * y in registers, and only the block's first value is carried to the next
block. Computes in float32. Imported only by `rlkit.kernels.advantages.reverse_scan` on the Triton path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compose(c_later, x_later, c_now, x_now):
    # (c_now, x_now) after (c_later, x_later): x_now + c_now * (x_later + c_later * y) as one affine map
    return c_now * c_later, x_now + c_now * x_later


@triton.jit
def _reverse_scan_kernel(x_ptr, c_ptr, y_ptr, T, stride_x, stride_c, stride_y, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_T)
    carry = tl.sum(tl.zeros((BLOCK_T,), tl.float32), 0)  # y just after the current block
    for i in range(tl.cdiv(T, BLOCK_T)):
        t = (tl.cdiv(T, BLOCK_T) - 1 - i) * BLOCK_T + offs
        ok = t < T
        # padding past T is the identity map (c = 1, x = 0), so it leaves the valid positions untouched
        x = tl.load(x_ptr + row * stride_x + t, mask=ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + row * stride_c + t, mask=ok, other=1.0).to(tl.float32)
        c_acc, x_acc = tl.associative_scan((c, x), 0, _compose, reverse=True)
        y = x_acc + c_acc * carry
        tl.store(y_ptr + row * stride_y + t, y.to(y_ptr.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where(offs == 0, y, 0.0), 0)


def triton_reverse_scan(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """x, decay (B, T) -> y (B, T) in x's dtype, with y_t = x_t + decay_t * y_{t+1}."""
    b, t = x.shape
    x, decay = x.contiguous(), decay.to(x.dtype).contiguous()
    y = torch.empty_like(x)
    if b and t:
        block = min(1024, max(16, triton.next_power_of_2(t)))
        _reverse_scan_kernel[(b,)](x, decay, y, t, x.stride(0), decay.stride(0), y.stride(0), BLOCK_T=block)
    return y
