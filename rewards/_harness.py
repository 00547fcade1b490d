"""The program that runs inside the sandbox (standard library only; passed to the interpreter with -c).

It reads the job (JSON) from stdin, sets the resource limits, runs the solution and reports *values* on the
result channel (its original stdout; the solution's own prints go to stderr). It never decides pass or fail:
the expected values stay outside, and the parent compares. Each record is one line, "<nonce> <json>", so text
the solution writes cannot pass for a record; the last one is {"done": true}, and a run without it (os._exit,
a crash, a kill) counts as failed.
"""

import json
import os
import resource
import subprocess
import sys

# Bound before the solution runs, so its monkeypatching of builtins or json cannot change how values are sent.
_type, _repr, _len, _dumps = type, repr, len, json.dumps
_PLAIN = (int, float, str, bool, type(None))
MAX_DEPTH = 64


def encode(value, depth=0):
    """A tagged JSON form of plain data; anything else (a class with a custom __eq__, say) is opaque."""
    kind = _type(value)
    if kind in _PLAIN:
        return value
    if depth > MAX_DEPTH:
        return {"opaque": "too deep"}
    if kind is list or kind is tuple:
        return {kind.__name__: [encode(v, depth + 1) for v in value]}
    if kind is set or kind is frozenset:
        return {"set": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    return {"opaque": kind.__name__}


def set_limits(rlimits):
    # Inside the sandbox's own user namespace RLIMIT_NPROC counts only this sandbox's processes (Linux >= 5.14).
    for name, value in rlimits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def run_function(job, emit):
    """Define the solution, then run the rewritten tests: each assert reports its operands' values."""
    ns = {"__name__": "solution"}
    try:
        exec(compile(job["code"], "solution.py", "exec"), ns)
    except BaseException as e:  # SystemExit included: the solution does not get to end the run quietly
        emit({"error": "solution: " + _type(e).__name__ + ": " + str(e)[:500]})
        return

    def record(index, thunk):
        try:
            values = thunk()
        except BaseException as e:
            emit({"assert": index, "error": _type(e).__name__ + ": " + str(e)[:500]})
            return
        emit({"assert": index, "values": [encode(v) for v in values]})

    ns["__rlkit_assert"] = record
    try:
        exec(compile(job["tests"], "tests.py", "exec"), ns)
        if "check" in ns:  # HumanEval style: check(candidate)
            ns["check"](ns[job["entry_point"]])
    except BaseException as e:
        emit({"error": "tests: " + _type(e).__name__ + ": " + str(e)[:500]})


def run_stdio(job, emit):
    """Run the solution as a program once per input; report its stdout and exit code."""
    path = "/tmp/solution.py"
    with open(path, "w") as f:
        f.write(job["code"])
    for i, text in enumerate(job["inputs"]):
        try:
            done = subprocess.run([sys.executable, "-I", "-S", path], input=text.encode(), capture_output=True,
                                  timeout=job["test_timeout_s"], cwd="/tmp")
        except subprocess.TimeoutExpired:
            emit({"test": i, "timeout": True})
            continue
        stdout = done.stdout[: job["max_stdout"]].decode("utf-8", "replace")
        emit({"test": i, "stdout": stdout, "exit": done.returncode})


def main():
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce")
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the solution's prints go to stderr
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job (and its nonce) cannot be read again from stdin
    os.close(null)

    def emit(record):
        channel.write(nonce + " " + _dumps(record) + "\n")
        channel.flush()

    set_limits(job["rlimits"])
    if job["mode"] == "function":
        run_function(job, emit)
    elif job["mode"] == "stdio":
        run_stdio(job, emit)
    else:  # "probe": the parent checks that sandboxes can start at all
        emit({"uid": os.getuid(), "pid": os.getpid()})
    emit({"done": True})


main()
