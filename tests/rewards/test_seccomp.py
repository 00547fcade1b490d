"""The sandbox's seccomp program, instruction by instruction (struct sock_filter: u16 code, u8 jt, u8 jf, u32 k)."""

import struct

import pytest

from rlkit.rewards.seccomp import build_filter


def decode(prog: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]


def test_x86_64_program():
    ops = decode(build_filter("x86_64"))
    # 0x20 load word, 0x15 jump-if-equal, 0x35 jump-if-greater-or-equal, 0x06 return; errno in the low 16 bits
    assert ops == [
        (0x20, 0, 0, 4), (0x15, 1, 0, 0xC000003E), (0x06, 0, 0, 0x00050001),  # another ABI: EPERM
        (0x20, 0, 0, 0), (0x35, 0, 1, 0x40000000), (0x06, 0, 0, 0x00050001),  # x32 numbers: EPERM
        # ptrace, process_vm_readv/writev, pidfd_getfd, kcmp, memfd_create, memfd_secret, shmget,
        # perf_event_open, bpf, userfaultfd, add_key, request_key, keyctl: EPERM
        *[op for nr in (101, 310, 311, 438, 312, 319, 447, 29, 298, 321, 323, 248, 249, 250)
          for op in ((0x15, 0, 1, nr), (0x06, 0, 0, 0x00050001))],
        (0x15, 0, 1, 425), (0x06, 0, 0, 0x00050026),  # io_uring_setup: ENOSYS (38)
        (0x15, 0, 3, 41), (0x20, 0, 0, 16), (0x15, 0, 1, 40), (0x06, 0, 0, 0x00050061),  # socket(AF_VSOCK): 97
        (0x06, 0, 0, 0x7FFF0000),  # everything else: allow
    ]
    # every jump lands inside the program
    assert all(i + 1 + max(jt, jf) < len(ops) for i, (code, jt, jf, _) in enumerate(ops) if code in (0x15, 0x35))


def test_aarch64_uses_its_own_numbers_and_an_unknown_machine_is_refused():
    ops = decode(build_filter("aarch64"))
    assert ops[1][3] == 0xC00000B7 and ops[6][3] == 117 and ops[8 + 2 * 14][3] == 198
    with pytest.raises(RuntimeError, match="no sandbox seccomp filter for riscv64"):
        build_filter("riscv64")
