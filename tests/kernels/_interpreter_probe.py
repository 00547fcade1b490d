"""Exits 0 when a trivial Triton kernel runs under TRITON_INTERPRET=1 on CPU tensors (see test_triton_kernels)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _double(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)


if __name__ == "__main__":  # pytest --doctest-modules imports this file too
    x = torch.arange(16, dtype=torch.float32)
    y = torch.empty_like(x)
    _double[(1,)](x, y, BLOCK=16)
    assert torch.equal(y, 2 * x), y
