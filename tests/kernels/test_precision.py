"""What `auto` precision means on each kind of machine: decided from torch's capability map (forced here each way),
by a probe where the map cannot tell; the probe itself measured on this machine, whatever its kind."""

import pytest

from rlkit.kernels import precision
from rlkit.kernels.precision import Support, cpu_support, cuda_support, matmul_slowdown

AVX2 = {"architecture": "x86_64", "avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False,
        "avx512_fp16": False, "amx_fp16": False}
AMX = AVX2 | {"avx512f": True, "amx_bf16": True, "amx_fp16": True}
AVX512_BF16 = AVX2 | {"avx512f": True, "avx512_bf16": True}
ARM_BF16 = {"architecture": "aarch64", "neon": True, "bf16": True, "sve_bf16": False, "fp16_arith": True}
ARM_OLD = {"architecture": "aarch64", "neon": True, "bf16": False, "sve_bf16": False, "fp16_arith": False}


def no_probe() -> float:
    raise AssertionError("the capability map decides; the probe must not run")


@pytest.mark.parametrize("caps, native", [(AVX2, False), (AMX, True), (AVX512_BF16, True), (ARM_BF16, True),
                                          (ARM_OLD, False)])
def test_the_capability_map_decides_bf16(caps, native):
    support = cpu_support("bfloat16", caps, no_probe)
    assert support.native is native
    assert caps["architecture"] in support.reason and ("native" if native else "emulated") in support.reason


def test_float16_has_its_own_flags():
    assert cpu_support("float16", AMX, no_probe).native and not cpu_support("float16", AVX512_BF16, no_probe).native
    assert cpu_support("float16", ARM_BF16, no_probe).native and not cpu_support("float16", ARM_OLD, no_probe).native


@pytest.mark.parametrize("caps", [None, {}, {"architecture": "riscv64"}, {"architecture": "x86_64", "avx2": True}])
def test_the_probe_decides_where_torch_cannot_tell(caps):
    # an older torch (no map), an architecture it does not describe, or a map without the bf16 flags
    emulated, native = cpu_support("bfloat16", caps, lambda: 480.0), cpu_support("bfloat16", caps, lambda: 0.4)
    assert not emulated.native and "480x slower than float32" in emulated.reason
    assert native.native and "probe" in native.reason
    assert cpu_support("bfloat16", caps, lambda: precision.NATIVE_SLOWDOWN).native  # the threshold is inclusive


def test_a_capped_onednn_isa_is_probed_not_read_from_the_flags():
    # ONEDNN_MAX_CPU_ISA=AVX2 on an AMX chip: the flags say native, the matmuls are emulated
    capped = cpu_support("bfloat16", AMX, lambda: 44.0, isa_cap="AVX2")
    assert not capped.native and capped.reason.startswith("ONEDNN_MAX_CPU_ISA=AVX2; probe")
    assert cpu_support("bfloat16", AMX, lambda: 0.4, isa_cap="AVX512_CORE_AMX").native
    assert cpu_support("bfloat16", AMX, no_probe, isa_cap="ALL").native  # no cap: the flags decide


def test_cuda_bf16_needs_ampere():
    assert cuda_support("bfloat16", (8, 0)).native and cuda_support("bfloat16", (9, 0)).native
    assert cuda_support("bfloat16", (7, 5), "T4") == Support(False, "T4 (sm_75): bfloat16 needs sm_80 or newer")
    assert cuda_support("float16", (7, 5)).native


def test_auto_follows_the_decision(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for caps, dtype in ((AVX2, "float32"), (AMX, "bfloat16")):
        monkeypatch.setattr(precision, "_cpu_capabilities", lambda caps=caps: caps)
        precision.half_support.cache_clear()
        assert precision.auto_dtype("cpu")[0] == dtype
    precision.half_support.cache_clear()  # leave the real decision for the tests that follow


def test_the_probe_measures_this_machine():
    # whatever this CPU is: a positive, finite ratio; float32 against itself is about 1
    assert 0 < matmul_slowdown("bfloat16", n=64, repeats=2) < 1e4
    assert 0.05 < matmul_slowdown("float32", n=64, repeats=5) < 20
