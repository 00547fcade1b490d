"""A seccomp filter for the sandbox, assembled here as classic BPF (bwrap loads it with `--seccomp FD`).

Namespaces do not cover every way out: AF_VSOCK sockets reach the hypervisor whatever the network namespace,
and io_uring can open sockets (IORING_OP_SOCKET) without the socket() system call that the filter sees. So:
- socket(AF_VSOCK, ...) fails with EAFNOSUPPORT, as on a host without vsock;
- io_uring_setup fails with ENOSYS, as on a kernel without io_uring;
- ptrace, process_vm_readv/writev, pidfd_getfd and kcmp fail with EPERM: one sandboxed process must not read
  or write another's memory or descriptors (the checker's, in rewards/_harness.py), whatever the host's Yama
  setting (many hosts do not restrict ptrace at all);
- memfd_create, memfd_secret and shmget fail with EPERM: memory held by such a file or segment is not in the
  writer's address space once unmapped, so RLIMIT_AS would not bound it;
- perf_event_open, bpf, userfaultfd and the kernel keyring calls fail with EPERM: kernel surface no solution needs;
- a system call made through another ABI (x32, or i386's int 0x80 on x86_64) fails with EPERM: those have
  their own numbers and their own socketcall(), which the checks above would not see.
Everything else is allowed; the other layers (rlimits, namespaces, the wall clock) still apply.
Layout of the checked data, `struct seccomp_data` (linux/seccomp.h): nr (u32) at 0, arch (u32) at 4, args at 16.
"""

from __future__ import annotations

import errno
import platform
import socket
import struct

# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_X32_BIT = 0x40000000
AF_VSOCK = getattr(socket, "AF_VSOCK", 40)

# machine -> (AUDIT_ARCH_*, socket nr, io_uring_setup nr, whether nr >= 0x40000000 is the x32 ABI)
_ARCHES = {
    "x86_64": (0xC000003E, 41, 425, True),
    "aarch64": (0xC00000B7, 198, 425, False),
}
# Denied with EPERM, by name -> (x86_64 nr, aarch64 nr) (arch/x86/entry/syscalls/syscall_64.tbl,
# include/uapi/asm-generic/unistd.h).
DENIED = {
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272), "memfd_create": (319, 279), "memfd_secret": (447, 447),
    "shmget": (29, 194), "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
}


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, native byte order


def _errno(code: int) -> int:
    return _ERRNO | code


def build_filter(machine: str | None = None) -> bytes:
    """The filter program (struct sock_filter[]) for `machine` (default: this host's)."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise RuntimeError(f"no sandbox seccomp filter for {machine}; supported: {', '.join(_ARCHES)}")
    arch, socket_nr, uring_nr, x32 = _ARCHES[machine]
    deny_abi, no_uring, no_vsock = _errno(errno.EPERM), _errno(errno.ENOSYS), _errno(errno.EAFNOSUPPORT)
    column = list(_ARCHES).index(machine)
    prog = [
        _op(_LD_W_ABS, 4),  # arch
        _op(_JEQ_K, arch, 1, 0),
        _op(_RET_K, deny_abi),
        _op(_LD_W_ABS, 0),  # nr
        _op(_JGE_K, _X32_BIT if x32 else 0xFFFFFFFF, 0, 1),
        _op(_RET_K, deny_abi),
    ]
    for numbers in DENIED.values():
        prog += [_op(_JEQ_K, numbers[column], 0, 1), _op(_RET_K, _errno(errno.EPERM))]
    prog += [
        _op(_JEQ_K, uring_nr, 0, 1),
        _op(_RET_K, no_uring),
        _op(_JEQ_K, socket_nr, 0, 3),
        _op(_LD_W_ABS, 16),  # args[0], its low 32 bits (little-endian): the address family
        _op(_JEQ_K, AF_VSOCK, 0, 1),
        _op(_RET_K, no_vsock),
        _op(_RET_K, _ALLOW),
    ]
    return b"".join(prog)
