"""Run untrusted Python under bubblewrap: no network, read-only system, private /tmp, resource limits.

Layers, each because the one before it is not enough on its own:
- bubblewrap namespaces: a new user, pid, network (loopback only, no route out), ipc, uts and cgroup namespace;
  the filesystem is /usr (read-only, plus the interpreter's prefix when it lives elsewhere), a fresh /proc and
  /dev, and a size-capped tmpfs /tmp. No /etc, /home, /root or the repository: host files are not there.
- rlimits, set by the harness inside the sandbox before the solution runs: address space, CPU seconds, file
  size, open files, no core dumps, and processes. RLIMIT_NPROC is set *inside* the sandbox's own user namespace,
  where Linux (>= 5.14) counts only that namespace's processes, so 100 concurrent sandboxes do not share one
  count, and a fork bomb stops at the limit.
- a wall clock in the parent: past `wall_s` the whole process group is killed (and with the sandbox's pid 1,
  every process in its pid namespace).
- when the parent is root, bubblewrap itself runs as `nobody`: root's processes are exempt from RLIMIT_NPROC,
  and bubblewrap run by root would map the sandbox to root outside.
- an empty environment for bubblewrap itself: its copy that is the sandbox's pid 1 keeps the environment it
  was started with, which the solution can read from /proc/1/environ (the trainer's tokens, say).
- a seccomp filter (rewards/seccomp.py): no AF_VSOCK sockets, which the network namespace does not cover; no
  ptrace, process_vm_readv/writev or pidfd_getfd (one sandboxed process cannot reach into another); no memfd
  or SysV shared memory (memory outside RLIMIT_AS).
- the harness is the sandbox's pid 1 (--as-pid-1): no bwrap init runs there without the limits and the filter,
  and being init, it ignores signals from inside. It makes itself non-dumpable, so /proc/1/mem, fd/ and environ
  are closed to the solution, and runs the tests in its own process, calling the solution in another
  (rewards/_harness.py): nothing the solution writes reaches the result channel except its return values.
- writable memory filesystems: only /tmp (tmp_mb); /dev is remounted read-only (its tmpfs, and /dev/shm in it,
  were sized at half the host's RAM, outside every limit). So a sandbox holds at most processes x memory_mb of
  address space plus tmp_mb of files.

The result channel is untrusted too: a record is parsed only when it is shallow enough (its size is bounded
by `output_kb`), and a malformed one (the solution found the nonce and forged it) fails the run rather than
the parser.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkit.rewards.seccomp import build_filter

# the program the sandbox runs: the codec (rewards/_codec.py), then the harness that uses it
_HARNESS = "\n".join((Path(__file__).with_name(name)).read_text() for name in ("_codec.py", "_harness.py"))
NOBODY = 65534
_SECCOMP = build_filter()
MAX_RECORD_DEPTH = 200  # the harness nests at most ~130 levels (encode's MAX_DEPTH, two JSON levels each)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot build a sandbox on this host; code is never run without one."""


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # the whole run, all tests; then the process group is killed
    cpu_s: int = 10  # RLIMIT_CPU per process
    memory_mb: int = 512  # RLIMIT_AS per process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file a process may write
    processes: int = 32  # RLIMIT_NPROC inside the sandbox's user namespace
    open_files: int = 64  # RLIMIT_NOFILE
    tmp_mb: int = 64  # size of the private /tmp
    output_kb: int = 4096  # result channel; past it the run is killed and fails
    stderr_kb: int = 16  # kept for diagnostics only

    def rlimits(self) -> dict[str, int]:
        mb = 1 << 20
        return {"RLIMIT_AS": self.memory_mb * mb, "RLIMIT_CPU": self.cpu_s, "RLIMIT_FSIZE": self.file_size_mb * mb,
                "RLIMIT_NOFILE": self.open_files, "RLIMIT_CORE": 0, "RLIMIT_NPROC": self.processes,
                "RLIMIT_MSGQUEUE": 0}  # POSIX message queues: kernel memory outside RLIMIT_AS


@dataclass(frozen=True)
class SandboxResult:
    records: list[dict[str, Any]]  # the harness's records, in order (only lines carrying this run's nonce)
    done: bool  # the harness reached its end: without this, nothing the run reported can be trusted as a pass
    timed_out: bool  # killed at wall_s
    output_exceeded: bool  # killed for writing more than output_kb
    returncode: int | None
    stderr: str = field(default="", repr=False)  # the tail kept for diagnostics
    malformed: bool = False  # a line carrying the nonce was not a record (forged): the run counts as failed


def _world_readable(path: Path) -> bool:
    """Whether `nobody` can reach and read `path` (every parent searchable, the file readable)."""
    try:
        if not os.stat(path).st_mode & stat.S_IROTH:
            return False
        return all(os.stat(p).st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def _interpreter(python: str, as_root: bool) -> Path:
    if python:
        chosen = Path(shutil.which(python) or python).resolve()
    else:
        chosen = Path(sys.executable).resolve()
        if as_root and not _world_readable(chosen) and Path("/usr/bin/python3").exists():
            chosen = Path("/usr/bin/python3").resolve()  # e.g. a pyenv build under /root, which nobody cannot read
    if not chosen.is_file():
        raise SandboxUnavailable(f"sandbox python '{python or sys.executable}' not found")
    if as_root and not _world_readable(chosen):
        raise SandboxUnavailable(f"sandbox python {chosen} is not readable by 'nobody'; pass python=/usr/bin/python3")
    return chosen


class Sandbox:
    """Runs harness jobs under bubblewrap; `run(job)` -> SandboxResult. Probes the host at construction."""

    def __init__(self, limits: SandboxLimits = SandboxLimits(), python: str = ""):
        self.limits = limits
        self.bwrap = shutil.which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed; "
                                     "install it with: apt-get install -y bubblewrap")
        self.as_root = os.geteuid() == 0
        self.python = _interpreter(python, self.as_root)
        self.argv = self._argv()
        self._probe()

    def _argv(self) -> list[str]:
        argv = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY),
                "--gid", str(NOBODY), "--hostname", "sandbox", "--die-with-parent", "--new-session",
                "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr symlinks, or real dirs
            host = Path("/") / name
            if host.is_symlink():
                argv += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                argv += ["--ro-bind", str(host), str(host)]
        prefix = self.python.parents[1]
        if not str(self.python).startswith("/usr/"):
            argv += ["--ro-bind", str(prefix), str(prefix)]  # e.g. a pyenv interpreter and its stdlib
        # /dev read-only: its tmpfs (and /dev/shm in it) would be writable memory outside every limit; the
        # device nodes in it are bind mounts and stay usable. --as-pid-1: the harness is the sandbox's init, so
        # no process runs there without its limits and seccomp filter (bwrap's own init had neither).
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--as-pid-1",
                 "--size", str(self.limits.tmp_mb << 20), "--tmpfs", "/tmp",
                 "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                 "--setenv", "LANG", "C.UTF-8", "--seccomp", "{seccomp}", "--info-fd", "{info}",  # fds, per run
                 "--", str(self.python), "-I", "-S", "-c", _HARNESS]
        return argv

    def _probe(self) -> None:
        try:
            result = self.run({"mode": "probe"})
        except OSError as e:
            raise SandboxUnavailable(f"cannot start {self.bwrap}: {e}") from e
        if not result.done:
            hint = ("the kernel or a security policy refuses unprivileged user namespaces; check "
                    "sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0 and, on Ubuntu 24.04+, "
                    "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap")
            raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here (exit {result.returncode}: "
                                     f"{result.stderr.strip()[-500:]!r}); {hint}")

    def run(self, job: dict[str, Any]) -> SandboxResult:
        """Run one harness job (see rewards/_harness.py for its fields); never raises for what the code does."""
        nonce = secrets.token_hex(16)
        payload = json.dumps(dict(job, nonce=nonce, rlimits=self.limits.rlimits(), source=_HARNESS,
                                  max_reply=self.limits.output_kb << 10)).encode()
        stdin = _memfd("rlkit-job", payload)  # read once by the harness, then its stdin is /dev/null
        seccomp = _memfd("rlkit-seccomp", _SECCOMP)  # read once by bwrap
        info, info_w = os.pipe()  # bwrap writes {"child-pid": N}: the sandbox's pid 1, seen from here
        try:
            fds = {"{seccomp}": str(seccomp), "{info}": str(info_w)}
            argv = [fds.get(a, a) for a in self.argv]
            drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if self.as_root else {}
            # env={}: bwrap's own environment is what the sandbox's pid 1 shows in /proc/1/environ
            proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
                                    start_new_session=True, close_fds=True, pass_fds=(seccomp, info_w), **drop)
        except BaseException:
            os.close(info)
            raise
        finally:
            for fd in (stdin, seccomp, info_w):
                os.close(fd)
        stdout, stderr, timed_out, exceeded = self._collect(proc, info)
        records, malformed = _records(stdout, nonce)
        done = not malformed and any(r.get("done") is True for r in records)
        return SandboxResult(records, done, timed_out, exceeded, proc.returncode,
                             stderr.decode("utf-8", "replace"), malformed)

    def _collect(self, proc: subprocess.Popen, info: int) -> tuple[bytes, bytes, bool, bool]:
        """Read stdout and stderr until both close, the wall clock runs out or stdout passes its cap."""
        deadline = time.monotonic() + self.limits.wall_s
        caps = {proc.stdout: self.limits.output_kb << 10, proc.stderr: self.limits.stderr_kb << 10}
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        timed_out = exceeded = False
        with selectors.DefaultSelector() as sel:
            for pipe in bufs:
                sel.register(pipe, selectors.EVENT_READ)
            while sel.get_map() and not exceeded:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    buf = bufs[key.fileobj]
                    if key.fileobj is proc.stderr:
                        buf[:] = (buf + chunk)[-caps[proc.stderr]:]  # keep the tail: that is where tracebacks are
                    elif len(buf) + len(chunk) > caps[proc.stdout]:
                        exceeded = True
                    else:
                        buf += chunk
        self._kill(proc, _child_pid(info))
        for pipe in bufs:
            pipe.close()
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), timed_out, exceeded

    @staticmethod
    def _kill(proc: subprocess.Popen, child: int | None) -> None:
        # Always, even after a clean exit: a daemonised child may linger. The sandbox's pid 1 (`child`, bwrap's
        # child, in a session of its own) goes first: with it the kernel kills every process in its pid
        # namespace. Then bwrap's group. bwrap does not reap pid 1 (it exits on pid 1's report), so pid 1 is an
        # orphan; where this process is a subreaper (the scorer's workers are) it is ours, and reaped here,
        # rather than a zombie of a host init that may never reap it.
        if child is not None:
            _signal_child(child, (proc.pid, os.getpid()))
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if child is not None:
            _reap(child)


def become_subreaper() -> None:
    """Orphans below this process (the sandboxes' pid 1s) become its children, for `Sandbox` to reap.
    For a process that owns what it starts, e.g. a scorer worker: not for a trainer running other libraries."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _child_pid(info: int) -> int | None:
    """The pid bwrap reported on --info-fd (it has written and closed it by the time the run ends)."""
    os.set_blocking(info, False)
    try:
        data = os.read(info, 4096)
    except OSError:
        data = b""
    finally:
        os.close(info)
    match = re.search(rb'"child-pid"\s*:\s*(\d+)', data)
    return int(match.group(1)) if match else None


def _signal_child(pid: int, parents: tuple[int, ...]) -> None:
    """SIGKILL `pid` if it is still the child of one of `parents` (so not a recycled pid)."""
    try:
        fd = os.pidfd_open(pid)  # from here on, this very process, whatever happens to the number
    except OSError:
        return
    try:
        if _parent(pid) in parents:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (OSError, ValueError):
        pass
    finally:
        os.close(fd)


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...


def _reap(pid: int, within_s: float = 2.0) -> None:
    """Reap `pid` if it is our child (orphaned to this subreaper); it was killed, so it ends promptly."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not ours (this process is no subreaper): the host init's to reap
            return
        time.sleep(0.002)


def _records(stdout: bytes, nonce: str) -> tuple[list[dict[str, Any]], bool]:
    """(the records carrying `nonce`, whether any line carrying it was malformed: too deep, not JSON, not an
    object). Never raises for what the sandbox wrote; the size is bounded by `output_kb`."""
    prefix = nonce.encode() + b" "
    records, malformed = [], False
    for line in stdout.splitlines():
        if not line.startswith(prefix):
            continue  # not from the harness (or forged without the nonce)
        body = line[len(prefix):]
        record = _parse_record(body) if _depth(body) <= MAX_RECORD_DEPTH else None
        if record is None:
            malformed = True
        else:
            records.append(record)
    return records, malformed


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def _depth(body: bytes) -> int:
    """The deepest nesting of brackets in JSON text, strings skipped (an upper bound on json's recursion)."""
    if body.count(b"[") + body.count(b"{") <= MAX_RECORD_DEPTH:
        return 0  # the usual record: too few brackets to nest too deep
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(1 if b in b"[{" else -1 for b in brackets), default=0)


def _parse_record(body: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(body)
    except (ValueError, RecursionError, MemoryError):
        return None
    return record if isinstance(record, dict) else None
