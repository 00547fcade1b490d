"""Pick an op's implementation once per (op, choice), and say which in the log.

Standard library and torch only: `rlkit.kernels.advantages` imports this and must stay light.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("rlkit.kernels")
_logged: set[tuple[str, str]] = set()


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on CPU tensors (slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_impl(op: str, impl: str, x: torch.Tensor, triton_ok: bool = True) -> str:
    """'auto' -> 'triton' for CUDA tensors when triton imports and `triton_ok` (the kernel takes these inputs)."""
    if impl == "auto":
        impl = "triton" if x.is_cuda and triton_ok and triton_available() else "torch"
    elif impl not in ("torch", "triton"):
        raise ValueError(f"{op} impl '{impl}' is not one of auto, torch, triton")
    elif impl == "triton":
        if not triton_ok:
            raise ValueError(f"{op} impl='triton' does not take {x.dtype} inputs; use impl='torch'")
        if not (x.is_cuda or interpreting()):
            raise ValueError(f"{op} impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    if (op, impl) not in _logged:
        _logged.add((op, impl))
        log.info("%s: using the %s implementation", op, impl)
    return impl
