"""Which half precision the hardware computes natively, and the dtype `auto` means on it.

A bf16 matmul on a CPU without AVX512-BF16 or AMX (most x86 laptops and desktops before 2023) is emulated: on an
AVX2 machine it runs about 500x slower than float32 (0.3 against 157 GFLOP/s at 2048^2). `auto` therefore means
bfloat16 only where it is native and float32 elsewhere:

- CUDA: bf16 is native from compute capability 8.0 (Ampere) on; fp16 on every GPU torch supports.
- CPU: what torch reports (`torch.cpu.get_capabilities()`): x86 `avx512_bf16` or `amx_bf16` (fp16: `avx512_fp16` or
  `amx_fp16`); ARM `bf16` or `sve_bf16` (fp16: `fp16_arith`). Where torch reports neither way (an older torch, an
  architecture it does not describe), a one-time micro-probe times a small matmul in the half dtype against float32
  and calls it native when it is at most `NATIVE_SLOWDOWN` times slower. The probe also decides where
  `ONEDNN_MAX_CPU_ISA` caps the instruction set oneDNN (torch's CPU matmul) may use: the flags then describe the
  chip, not what its matmuls run (`ONEDNN_MAX_CPU_ISA=AVX2` on an AMX chip emulates bf16, about 44x slower).

The decision is made once per process and device (`half_support` is cached); `slowdown` measures the factor an
explicit half dtype costs where it is not native, for the warning that names it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

HALF = ("bfloat16", "float16")
# A half-precision matmul at most this many times slower than float32 counts as native for the probe. Native bf16
# CPUs run it faster than float32 (AMX: 0.4x at 256^2); emulation is 10-500x slower.
NATIVE_SLOWDOWN = 3.0
# capability flags torch reports for native half arithmetic, per architecture family and dtype
_NATIVE_FLAGS = {
    ("x86", "bfloat16"): ("avx512_bf16", "amx_bf16"),
    ("x86", "float16"): ("avx512_fp16", "amx_fp16"),
    ("arm", "bfloat16"): ("bf16", "sve_bf16"),
    ("arm", "float16"): ("fp16_arith",),
}


@dataclass(frozen=True)
class Support:
    """Whether a device computes a half dtype natively, and why we think so (one line, for the log)."""

    native: bool
    reason: str


def _family(caps: Mapping) -> str | None:
    """'x86', 'arm' or None, from the architecture torch reports."""
    arch = str(caps.get("architecture", "")).lower()
    if arch in ("x86_64", "amd64", "x86", "i686") or "x86" in arch:
        return "x86"
    if arch.startswith(("arm", "aarch64")):
        return "arm"
    return None


def cpu_support(dtype: str, caps: Mapping | None, probe: Callable[[], float], isa_cap: str | None = None) -> Support:
    """The decision for a CPU, from torch's capability map (None: torch has none), with `probe` (the measured
    slowdown of a half matmul against float32) asked only when the map cannot tell or `isa_cap` (the value of
    ONEDNN_MAX_CPU_ISA, when set) limits what the matmuls may use.

    >>> cpu_support("bfloat16", {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False},
    ...             probe=lambda: 1 / 0)
    Support(native=False, reason='CPU x86_64 without avx512_bf16 or amx_bf16: bfloat16 is emulated')
    >>> cpu_support("bfloat16", {"architecture": "x86_64", "amx_bf16": True}, probe=lambda: 1 / 0).native
    True
    >>> cpu_support("bfloat16", None, probe=lambda: 480.0)
    Support(native=False, reason='CPU capability unknown to torch; probe: a bfloat16 matmul runs 480x slower than float32')
    >>> cpu_support("bfloat16", {"architecture": "x86_64", "amx_bf16": True}, probe=lambda: 44.0, isa_cap="AVX2")
    Support(native=False, reason='ONEDNN_MAX_CPU_ISA=AVX2; probe: a bfloat16 matmul runs 44x slower than float32')
    """
    if isa_cap and isa_cap.upper() not in ("ALL", "DEFAULT"):
        factor = probe()
        return Support(factor <= NATIVE_SLOWDOWN, f"ONEDNN_MAX_CPU_ISA={isa_cap}; probe: a {dtype} matmul runs "
                                                  f"{times_slower(factor)}")
    family = _family(caps) if caps else None
    flags = _NATIVE_FLAGS.get((family, dtype)) if family else None
    if flags is not None and any(name in caps for name in flags):
        found = [name for name in flags if caps.get(name)]
        arch = caps.get("architecture")
        if found:
            return Support(True, f"CPU {arch} with {found[0]}: {dtype} is native")
        return Support(False, f"CPU {arch} without {' or '.join(flags)}: {dtype} is emulated")
    factor = probe()
    return Support(factor <= NATIVE_SLOWDOWN, f"CPU capability unknown to torch; probe: a {dtype} matmul runs "
                                              f"{times_slower(factor)}")


def cuda_support(dtype: str, capability: tuple[int, int], name: str = "GPU") -> Support:
    """The decision for a CUDA device of compute capability (major, minor).

    >>> cuda_support("bfloat16", (7, 5), "Tesla T4")
    Support(native=False, reason='Tesla T4 (sm_75): bfloat16 needs sm_80 or newer')
    >>> cuda_support("bfloat16", (9, 0), "H100").native, cuda_support("float16", (7, 0)).native
    (True, True)
    """
    major, minor = capability
    if dtype == "float16" or major >= 8:
        return Support(True, f"{name} (sm_{major}{minor}): {dtype} is native")
    return Support(False, f"{name} (sm_{major}{minor}): {dtype} needs sm_80 or newer")


def times_slower(factor: float) -> str:
    """A measured slowdown against float32, in words.

    >>> times_slower(480.2), times_slower(0.43)
    ('480x slower than float32', '0.43x the time of float32')
    """
    return f"{factor:.0f}x slower than float32" if factor >= 1.5 else f"{factor:.2f}x the time of float32"


def _cpu_capabilities() -> Mapping | None:
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.10
    try:
        return dict(get()) if get is not None else None
    except (RuntimeError, OSError):
        return None


def matmul_slowdown(dtype: str, n: int = 192, repeats: int = 3) -> float:
    """Time of an (n, n) x (n, n) CPU matmul in `dtype` over its float32 time, best of `repeats` each, on one
    thread (a busy machine's other threads then skew neither side): a millisecond where the dtype is native, about
    0.2 s on an AVX2 CPU emulating bf16."""
    def best(dt: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b  # warm-up: the first call picks and packs the kernel
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return max(min(times), 1e-9)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return best(getattr(torch, dtype)) / best(torch.float32)
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def half_support(dtype: str, device: str) -> Support:
    """Whether `device` ("cpu" or "cuda") computes `dtype` ("bfloat16" or "float16") natively, decided once."""
    if device == "cuda":
        index = torch.cuda.current_device()
        return cuda_support(dtype, torch.cuda.get_device_capability(index), torch.cuda.get_device_name(index))
    return cpu_support(dtype, _cpu_capabilities(), lambda: slowdown(dtype), os.environ.get("ONEDNN_MAX_CPU_ISA"))


@functools.lru_cache(maxsize=None)
def slowdown(dtype: str) -> float:
    """The measured CPU slowdown of `dtype` against float32 (cached: measured at most once per process)."""
    return matmul_slowdown(dtype)


def auto_dtype(device: str) -> tuple[str, str]:
    """What `auto` means on `device`: ("bfloat16", why) where bf16 is native, else ("float32", why)."""
    support = half_support("bfloat16", device)
    return ("bfloat16" if support.native else "float32"), support.reason


def device_kind() -> str:
    """'cuda' where this process sees a GPU, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe_machine() -> str:
    """One line for a benchmark's header: the device, torch's CPU capability and what `auto` precision means here."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = f"CPU {model}, capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    device = device_kind()
    gpu = f"GPU {torch.cuda.get_device_name(torch.cuda.current_device())}; " if device == "cuda" else ""
    dtype, why = auto_dtype(device)
    return f"{gpu}{cpu}; auto precision: {dtype} ({why})"
