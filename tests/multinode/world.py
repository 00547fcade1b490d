"""A two-node Ray cluster on one machine, for tests: what a real cluster has and `ray.cluster_utils.Cluster` hides.

Each node is a process tree in its own namespaces (`unshare --net --mount --pid --uts`):
- network: a virtual link (veth) between the two nodes' namespaces, the head at 10.213.7.1 and the worker at
  10.213.7.2, each with its own loopback and hostname (`rkhead`, `rkworker`, resolved by the node's own
  /etc/hosts). The link lives only inside the namespaces made here: no traffic and no address outside them, and
  a node's 127.0.0.1 reaches only that node.
- files: each node has its own /dev/shm (Ray's object store, vLLM's weight-sync folder) and Ray temp folder. The
  worker also has its own /tmp, over which only `shared` (the run storage every node sees, like an NFS mount) is
  mounted back; any other /tmp path the driver writes (`local`) is node-local: the worker does not see it.
- processes: each node's pid 1 is a bounded `sleep`, which dies with the test process; killing it makes the
  kernel kill every process of the node, so stopping (or a killed test run) leaves no Ray process behind, and the
  namespaces and their mounts vanish with their last process.

The driver (`python -m rlkit.run`, or any command) runs on the head node through `World.head.run`/`popen`.
Every wait is bounded. `World.check()` says in one line why the machine cannot host the world (not root, no
`unshare`/`ip`, namespaces refused), for the tests to skip with.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBNET = "10.213.7"  # private addresses, assigned only inside the namespaces this module makes
LIFETIME_S = 3 * 3600  # a node outlives no test session: its pid 1 is a bounded sleep
RAY_PORT = 6379  # each node's network namespace has its own ports: no clash with a Ray on the host
HOSTS = f"127.0.0.1 localhost\n{SUBNET}.1 rkhead\n{SUBNET}.2 rkworker\n"


class Node:
    """One node: a process tree in its own network, mount, pid and hostname namespaces."""

    def __init__(self, name: str, ip: str, env: dict[str, str]):
        self.name, self.ip, self.env = name, ip, env
        self.unshare = subprocess.Popen(
            ["unshare", "--net", "--mount", "--pid", "--uts", "--fork", "--kill-child", "--propagation", "private",
             "--mount-proc", "sleep", str(LIFETIME_S)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = _child_pid(self.unshare.pid)  # the node's pid 1, as the host sees it

    def enter(self, cmd: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
        """`cmd` run inside this node (its network, files and processes), in `cwd` (default: ours)."""
        return ["nsenter", "-t", str(self.pid), "--net", "--mount", "--pid", "--uts", f"--wd={cwd or os.getcwd()}",
                "env", *(f"{k}={v}" for k, v in self.env.items()), *cmd]

    def run(self, cmd: list[str], timeout: float = 60, check: bool = True, cwd=None,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        proc = subprocess.run(self.enter(cmd, cwd), timeout=timeout, text=True, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    def popen(self, cmd: list[str], cwd=None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.enter(cmd, cwd), text=True, **kwargs)

    def sh(self, script: str, timeout: float = 60) -> str:
        return self.run(["sh", "-euc", script], timeout=timeout).stdout

    def kill(self) -> None:
        """SIGKILL the node's pid 1: the kernel kills every process in the node."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.unshare.kill()
            self.unshare.wait(timeout=30)


def _die_with_parent() -> None:
    """In the forked `unshare`: SIGKILL it if the test process dies (PR_SET_PDEATHSIG); --kill-child passes that on
    to the node's pid 1, and the kernel to every process in the node. A killed test run leaves no node behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _child_pid(pid: int, timeout: float = 10.0) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = children.read_text().split() if children.exists() else []
        if text:
            return int(text[0])
        time.sleep(0.02)
    raise RuntimeError(f"unshare (pid {pid}) started no child within {timeout:.0f} s")


def check() -> str | None:
    """None when this machine can host the world, else one line saying why not."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the two-node world needs root on Linux (network, mount and pid namespaces)"
    missing = [tool for tool in ("unshare", "nsenter", "ip", "mount") if shutil.which(tool) is None]
    if missing:
        return f"the two-node world needs {', '.join(missing)} (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--mount", "--pid", "--uts", "--fork", "--mount-proc", "ip", "link"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"namespaces are not permitted here ({(probe.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


class World:
    """A Ray head and a Ray worker node, each in its own namespaces (module docstring). Use as a context manager.

    `shared`: the run storage both nodes see; `local`: a folder on the head's disk the worker cannot see.
    `address`: the Ray address a driver on the head joins (cluster.address)."""

    def __init__(self, cpus_per_node: int = 4, ray_timeout_s: float = 120.0):
        self.cpus, self.ray_timeout_s = cpus_per_node, ray_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="rkw", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.shared, self.local = self.root / "shared", self.root / "local"
        self.address = f"{SUBNET}.1:{RAY_PORT}"
        self.nodes: list[Node] = []

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def worker(self) -> Node:
        return self.nodes[1]

    def __enter__(self) -> "World":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for folder in (self.shared, self.local):
            folder.mkdir(parents=True)
        (self.root / "hosts").write_text(HOSTS)
        # the world's own Ray token: nothing read from or written to ~/.ray, which a Ray on the host may use
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.nodes = [Node("rkhead", f"{SUBNET}.1", env), Node("rkworker", f"{SUBNET}.2", env)]
        # the link: made in the head's namespace, its other end moved into the worker's
        subprocess.run(["nsenter", "-t", str(self.head.pid), "--net", "ip", "link", "add", "rk0", "type", "veth",
                        "peer", "name", "rk1", "netns", str(self.worker.pid)], check=True, timeout=30)  # host pids
        for node, dev in ((self.head, "rk0"), (self.worker, "rk1")):
            node.sh(f"hostname {node.name}; ip link set lo up; ip addr add {node.ip}/24 dev {dev}; "
                    f"ip link set {dev} up; mount --bind {self.root}/hosts /etc/hosts; "
                    "mount -t tmpfs -o mode=1777 tmpfs /dev/shm")
        # the worker's own /tmp, with only the shared storage mounted back (through a descriptor opened before)
        self.worker.sh(f"exec 3<{self.shared}; mount -t tmpfs -o mode=1777 tmpfs /tmp; mkdir -p {self.shared}; "
                       f"mount --no-canonicalize --bind /proc/self/fd/3 {self.shared}")
        self.head.sh(f"mkdir -p {self.root}/ray; mount -t tmpfs tmpfs {self.root}/ray")
        ray = [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--block",
               f"--num-cpus={self.cpus}", "--disable-usage-stats", "--object-store-memory=300000000"]
        logs = self.root / "logs"
        logs.mkdir()
        self.head.popen([*ray, "--head", f"--node-ip-address={self.head.ip}", f"--port={RAY_PORT}",
                         "--include-dashboard=false", f"--temp-dir={self.root}/ray"],
                        stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)
        self.wait_for(1)
        self.worker.popen([*ray, f"--address={self.address}", f"--node-ip-address={self.worker.ip}"],
                          stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT)
        self.wait_for(2)

    def wait_for(self, nodes: int) -> None:
        """Until the cluster has `nodes` live nodes, at most ray_timeout_s."""
        probe = ("import ray, sys, time\n"
                 f"ray.init(address='{self.address}', logging_level='ERROR', log_to_driver=False)\n"
                 f"deadline = time.monotonic() + {self.ray_timeout_s}\n"
                 f"while sum(n['Alive'] for n in ray.nodes()) < {nodes} and time.monotonic() < deadline:\n"
                 "    time.sleep(0.2)\n"
                 f"sys.exit(sum(n['Alive'] for n in ray.nodes()) < {nodes})\n")
        deadline = time.monotonic() + self.ray_timeout_s
        while True:  # the head's GCS may not listen yet: ray.init fails until it does
            proc = self.head.run([sys.executable, "-c", probe], timeout=self.ray_timeout_s + 30, check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the two-node world did not reach {nodes} Ray node(s) in {self.ray_timeout_s:.0f}"
                                   f" s: {proc.stderr[-1500:]}\n{self.log_tail()}")
            time.sleep(1)

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.root / "logs").glob("*.log")) if (self.root / "logs").exists() else []
        return "\n".join(f"--- {p.name}\n{p.read_text()[-chars:]}" for p in logs)

    def stop(self) -> None:
        """Kill both nodes (every process in them), then remove the world's folder; the namespaces and their
        mounts go with their last process."""
        for node in reversed(self.nodes):
            node.kill()
        self.nodes = []
        shutil.rmtree(self.root, ignore_errors=True)
