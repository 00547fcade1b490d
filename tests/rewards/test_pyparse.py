"""rlkit's parses survive threads that parse at once; `ast.parse` on CI's CPython 3.11.7 does not (cpython#106905).

The race needs a thread switch inside the AST constructor. The child process forces them: a tiny switch interval,
and a collector that runs on every allocation and calls a finalizer that yields. With `ast.parse` in place of
`parse` this script reports a SystemError within a few seconds on CPython 3.11.7 (in each of ten runs here).
"""

import subprocess
import sys
import textwrap

RACE = textwrap.dedent("""
    import gc, sys, threading, time
    from rlkit.envs.calculator import evaluate
    from rlkit.rewards.pyparse import parse

    sys.setswitchinterval(1e-6)
    gc.set_threshold(1, 1, 1)

    class Yields:
        def __del__(self):
            time.sleep(0)

    def garbage():
        a = Yields()
        a.cycle = a  # only the collector frees it, so finalizers run inside other threads' parses

    SOURCE = "def f(x):\\n" + "".join(f"    y{i} = [x + {i} for _ in range(3)] if x else (x, {i})\\n"
                                      for i in range(30)) + "    return x\\n"
    errors = []

    def work():
        for _ in range(200):
            try:
                parse(SOURCE)
                assert evaluate("(2 + 3) * -(4 - 1) ** 2") == -45
                garbage()
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                return

    def churn():
        for _ in range(20000):
            garbage()

    threads = [threading.Thread(target=work) for _ in range(8)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is still running after 120 s"
    print(len(errors), errors[:3])
""")


def test_threads_parse_at_once_without_a_system_error():
    run = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == "0", run.stdout
