"""Adversarial programs against the sandbox: each would pass if its hack worked, so each must score wrong.

The limits are small (2 s wall clock, 16 processes) so the hostile cases end quickly on a shared machine.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.code import CodeReward
from rlkit.rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable

DOUBLE = {"test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2", "entry_point": "f"}


@pytest.fixture(scope="module")
def reward():
    return CodeReward(wall_s=2.0, processes=16)


def function_result(reward, code):
    return reward.score(Sample("", code, DOUBLE))


def stdio_result(reward, code, expected):
    return reward.score(Sample("", code, {"inputs": [""], "outputs": [expected]}))


def test_an_honest_solution_passes(reward):
    result = function_result(reward, "def f(x):\n    return 2 * x")
    assert result.verdict == Verdict.CORRECT and result.info == {"passed": 2, "total": 2, "reason": ""}


def test_fork_bomb_is_contained(reward):
    marker = "forkbomb-7d1c"
    start = time.perf_counter()
    result = function_result(reward, f"import os\n# {marker}\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.verdict == Verdict.WRONG and result.info["reason"] == "time limit"
    assert time.perf_counter() - start < 6
    leftover = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert leftover == []  # the whole pid namespace went with the sandbox
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_process_limit_counts_only_this_sandbox():
    # 16 processes per sandbox: the harness plus bwrap's init leave 14 forks, whatever the rest of the host runs
    sandbox = Sandbox(SandboxLimits(wall_s=5, processes=16))
    code = ("import os, time\ndef f():\n    n = 0\n    while n < 100:\n        try:\n            pid = os.fork()\n"
            "        except OSError:\n            return n\n        if pid == 0:\n            time.sleep(3)\n"
            "            os._exit(0)\n        n += 1\n    return n")
    run = sandbox.run({"mode": "function", "code": code, "entry_point": "f",
                       "tests": "__rlkit_assert(0, lambda: (f(),))"})
    forks = run.records[0]["values"][0]
    assert 10 <= forks <= 14, forks


def test_infinite_loop_hits_the_wall_clock(reward):
    start = time.perf_counter()
    result = function_result(reward, "def f(x):\n    while True:\n        pass")
    assert result.verdict == Verdict.WRONG and result.info["reason"] == "time limit"
    assert time.perf_counter() - start < 5


def test_memory_bomb_fails_inside_its_limit(reward):
    result = function_result(reward, "def f(x):\n    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 26))")
    assert result.verdict == Verdict.WRONG and "MemoryError" in result.info["reason"]


def test_host_files_are_not_visible(reward, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host-secret-42")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # readable by anyone on the host: only the sandbox keeps it out
    code = f"print(open({str(secret)!r}).read())"
    assert stdio_result(reward, code, "host-secret-42").verdict == Verdict.WRONG
    for path in ("/etc/shadow", "/etc/passwd", "/work/shared/STYLE.md"):
        if os.access(path, os.R_OK):
            expected = open(path, errors="replace").read()
            assert stdio_result(reward, f"print(open({path!r}).read(), end='')", expected).verdict == Verdict.WRONG


def test_environment_is_not_inherited(reward, monkeypatch):
    monkeypatch.setenv("RLKIT_TEST_SECRET", "env-secret-99")
    code = "import os\nprint(os.environ.get('RLKIT_TEST_SECRET'))"
    assert stdio_result(reward, code, "env-secret-99").verdict == Verdict.WRONG
    assert stdio_result(reward, "import os\nprint(sorted(os.environ))", "['HOME', 'LANG', 'PATH', 'PWD']").verdict == Verdict.CORRECT


def test_no_network_not_even_the_hosts_loopback(reward):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        server.settimeout(5)
        try:
            conn, _ = server.accept()
            conn.sendall(b"net-secret")
            conn.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint(s.recv(100).decode())"
    assert stdio_result(reward, code, "net-secret").verdict == Verdict.WRONG
    code = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\nprint('connected')"
    assert stdio_result(reward, code, "connected").verdict == Verdict.WRONG
    server.close()


@pytest.mark.parametrize(
    "code",
    [
        "import os\ndef f(x):\n    return 0\nos._exit(0)",  # leave before any assert runs
        "import sys\ndef f(x):\n    return 0\nsys.exit(0)",
        # forge the final record on every descriptor, without the nonce
        "import os\ndef f(x):\n    return 0\nfor fd in range(1, 20):\n    try:\n        os.write(fd, b'{\"done\": true}\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)",
        # an answer that equals everything
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes()",
        "class Yes(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes(0)",
        # patch the comparison machinery the sandbox might use
        "import builtins\nbuiltins.AssertionError = type('N', (BaseException,), {})\ndef f(x):\n    return 0",
    ],
    ids=["os._exit", "sys.exit", "forged-record", "eq-always-true", "int-subclass-eq", "patch-builtins"],
)
def test_hacks_score_wrong(reward, code):
    assert function_result(reward, code).verdict == Verdict.WRONG


def test_expected_values_never_enter_the_sandbox(reward):
    # the solution searches everything it can reach for the expected answer; the literal is not there
    gold = {"test": "def check(candidate):\n    assert candidate() == 'expected-7f3a'", "entry_point": "f"}
    code = ("import gc, sys\ndef f():\n    for o in gc.get_objects():\n        if type(o) is type(f) and o.__name__ == 'check':\n"
            "            for c in o.__code__.co_consts:\n                if isinstance(c, str) and c.startswith('expected'):\n"
            "                    return c\n    return 'nothing'")
    assert reward.score(Sample("", code, gold)).verdict == Verdict.WRONG


def test_flooding_the_output_is_cut_off(reward):
    code = "import os\ndef f(x):\n    return 2 * x\nfor fd in (1, 2, 3, 4):\n    try:\n        os.write(fd, b'x' * (8 << 20))\n    except OSError:\n        pass"
    result = function_result(reward, code)
    assert result.verdict in (Verdict.WRONG, Verdict.CORRECT)  # ends, and the parent's buffers stay bounded


def test_a_hundred_concurrent_jobs(tmp_path):
    # Honest solutions that fork 8 children each must pass while 75 hostile ones run beside them: process
    # counts are per sandbox, and no job sees another's failure.
    reward = CodeReward(wall_s=20.0, processes=16)
    honest = ("import os, time\ndef f(x):\n    pids = []\n    for _ in range(8):\n        pid = os.fork()\n"
              "        if pid == 0:\n            time.sleep(0.5)\n            os._exit(0)\n        pids.append(pid)\n"
              "    for p in pids:\n        os.waitpid(p, 0)\n    return 2 * x")
    hacks = ["import os\ndef f(x):\n    return 0\nos._exit(0)",
             "class Yes:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return Yes()",
             "def f(x):\n    return [0] * (1 << 40)"]
    jobs = [honest if i % 4 == 0 else hacks[i % 4 - 1] for i in range(100)]
    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda code: function_result(reward, code), jobs))
    verdicts = [r.verdict for r in results]
    assert [v for i, v in enumerate(verdicts) if i % 4 == 0] == [Verdict.CORRECT] * 25, [r.info for r in results[::4]]
    assert all(v == Verdict.WRONG for i, v in enumerate(verdicts) if i % 4)
    assert subprocess.run(["true"]).returncode == 0


def test_missing_bubblewrap_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        Sandbox()


def test_a_bwrap_that_cannot_create_namespaces_is_an_error(monkeypatch):
    folder = Path(tempfile.mkdtemp())
    folder.chmod(0o755)  # run as `nobody` when the tests run as root
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = shutil.which
    monkeypatch.setattr("shutil.which", lambda name: str(fake) if name == "bwrap" else real_which(name))
    try:
        with pytest.raises(SandboxUnavailable, match="uid map: Permission denied.*user namespaces"):
            Sandbox()
    finally:
        shutil.rmtree(folder)
