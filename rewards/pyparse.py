"""`ast.parse` that threads may call at the same time.

CPython releases without the fix of python/cpython#106905 (PR #113035, December 2023; the Python 3.11.7 that CI
runs is one) keep the AST constructor's recursion depth in interpreter-wide state. When two threads build syntax
trees at once (a thread switch inside `ast.parse`, e.g. while the garbage collector runs a finalizer), one thread
reads the depth the other set, and `ast.parse` raises `SystemError: AST constructor recursion depth mismatch` on
valid input. rlkit parses untrusted text from threads: environments' tool calls (`rlkit.algorithms.episodes` steps
them on a thread pool) and rewards that a user calls from threads. One lock serialises rlkit's own parses; parsing
is microseconds next to what the text is parsed for."""

from __future__ import annotations

import ast
import threading

_LOCK = threading.RLock()  # reentrant: a finalizer that parses, run by the collector inside a parse, must not deadlock


def parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse(source, mode=mode)`, one thread at a time; raises what `ast.parse` raises."""
    with _LOCK:
        return ast.parse(source, mode=mode)
