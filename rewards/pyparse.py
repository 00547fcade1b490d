"""`ast.parse` that threads may call at the same time.

CPython before 3.13 keeps the AST constructor's recursion depth in interpreter-wide state. When two threads build
syntax trees at once (a thread switch inside `ast.parse`, e.g. while the garbage collector runs a finalizer), the
depth one thread set is read by the other, and `ast.parse` raises `SystemError: AST constructor recursion depth
mismatch` on valid input (python/cpython#106905). rlkit parses untrusted text from threads: environments' tool calls
(`rlkit.algorithms.episodes` steps them on a thread pool) and rewards that a user calls from threads. One lock
serialises rlkit's own parses; parsing is microseconds next to what the text is parsed for.
"""

from __future__ import annotations

import ast
import threading

_LOCK = threading.RLock()  # reentrant: a finalizer that parses, run by the collector inside a parse, must not deadlock


def parse(source: str, mode: str = "exec") -> ast.AST:
    """`ast.parse(source, mode=mode)`, one thread at a time; raises what `ast.parse` raises."""
    with _LOCK:
        return ast.parse(source, mode=mode)
