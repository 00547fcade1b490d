"""The program that runs inside the sandbox (standard library only; passed to the interpreter with -c).

Two processes, as contest judges run them, so that nothing the solution can write decides a verdict:
- the checker (this program's main role, the sandbox's pid 1): reads the job (JSON) from stdin, sets the
  resource limits, makes itself non-dumpable (so its memory, descriptors and environment cannot be opened
  through /proc by a process of the same user), starts the solution process and runs the tests. Every call
  of the entry point in the tests goes over a pipe to the solution process, which answers with the return
  value as tagged JSON data; the checker decodes it to plain data and reports the asserts' operand values on
  the result channel (its original stdout, which the solution process never holds). It never decides pass or
  fail: the expected values stay in the parent, which compares.
- the solution process (role "solution": the same source, started with that argument): defines the solution,
  then serves calls. It can write anything to its reply pipe; the checker reads it as untrusted data (bounded
  size, bounded depth), so a forged reply can only make a call fail.
Each record is one line, "<nonce> <json>"; the last one is {"done": true}, and a run without it (a crash, a
kill) counts as failed. The job's helpers from the prompt (trusted data, `prefix`) run in the checker too, so
expected values a test computes with them do not depend on the solution.

The sandbox runs rewards/_codec.py's source followed by this file's, as one program (see sandbox.py).
"""

import json
import os
import resource
import signal
import subprocess
import sys

# encode, decode, Opaque and _type come from rewards/_codec.py, whose source sandbox.py puts in front of this file's.


def set_limits(rlimits):
    # Inside the sandbox's own user namespace RLIMIT_NPROC counts only this sandbox's processes (Linux >= 5.14).
    for name, value in rlimits.items():
        resource.setrlimit(getattr(resource, name), (value, value))


def make_undumpable():
    """Same-user processes can no longer open /proc/<pid>/mem, fd/, environ of this one (ptrace access check)."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


class SolutionError(Exception):
    """The solution raised, or its process answered nothing usable."""


class Solution:
    """The solution process, seen from the checker: `call(args, kwargs)` -> the decoded return value."""

    def __init__(self, source, max_reply):
        to_child, self._requests = os.pipe()
        self._replies_r, from_child = os.pipe()
        self.max_reply = max_reply
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", source, "solution", str(to_child), str(from_child)],
            stdin=subprocess.DEVNULL, stdout=2, stderr=2, pass_fds=(to_child, from_child), cwd="/tmp")
        os.close(to_child)
        os.close(from_child)
        self.requests = os.fdopen(self._requests, "wb")
        self.replies = os.fdopen(self._replies_r, "rb")

    def send(self, message):
        try:
            self.requests.write(json.dumps(message).encode() + b"\n")
            self.requests.flush()
        except (OSError, ValueError) as e:
            raise SolutionError("the solution process is gone") from e

    def receive(self):
        line = self.replies.readline(self.max_reply + 1)
        if not line.endswith(b"\n"):
            raise SolutionError("the solution process ended" if len(line) <= self.max_reply else "reply too large")
        try:
            reply = json.loads(line)
        except (ValueError, RecursionError, MemoryError):
            raise SolutionError("malformed reply") from None
        if _type(reply) is not dict:
            raise SolutionError("malformed reply")
        if "error" in reply:
            raise SolutionError(str(reply["error"])[:500])
        return reply

    def call(self, *args, **kwargs):
        self.send({"args": encode(list(args)), "kwargs": encode(kwargs)})
        return decode(self.receive().get("value"))


def run_function(job, emit):
    """Start the solution, then run the rewritten tests here: each assert reports its operands' values."""
    solution = Solution(job["source"], job.get("max_reply", 1 << 22))
    try:
        solution.send({"code": job["code"], "entry_point": job["entry_point"]})
        solution.receive()  # {"ready": true}, or the error its definition raised
    except SolutionError as e:
        emit({"error": "solution: " + str(e)})
        return
    ns = {"__name__": "tests"}
    try:  # the prompt's helpers (trusted, like the tests); a prompt that does not run alone is left out
        exec(compile(job.get("prefix", ""), "prompt.py", "exec"), ns)
    except BaseException:
        ns = {"__name__": "tests"}
    ns[job["entry_point"]] = candidate = solution.call

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
            ns["check"](candidate)
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


def serve_solution(requests_fd, replies_fd):
    """The solution process: define the solution, then answer calls until the checker closes the pipe."""
    requests, replies = os.fdopen(requests_fd, "rb"), os.fdopen(replies_fd, "wb")
    dumps = json.dumps  # bound before the solution runs: patching json only garbles its own replies

    def reply(message):
        replies.write(dumps(message).encode() + b"\n")
        replies.flush()

    job = json.loads(requests.readline())
    ns = {"__name__": "solution"}
    try:
        exec(compile(job["code"], "solution.py", "exec"), ns)
        function = ns[job["entry_point"]]
    except BaseException as e:  # SystemExit included
        reply({"error": _type(e).__name__ + ": " + str(e)[:500]})
        return
    reply({"ready": True})
    for line in requests:
        call = json.loads(line)
        try:
            value = function(*decode(call["args"]), **decode(call["kwargs"]))
            message = {"value": encode(value)}
        except BaseException as e:
            message = {"error": _type(e).__name__ + ": " + str(e)[:500]}
        reply(message)


def main():
    job = json.loads(sys.stdin.buffer.read())
    nonce = job.pop("nonce")
    make_undumpable()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pid 1: a signal without a handler from inside is ignored
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # prints go to stderr
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job (and its nonce) cannot be read again from stdin
    os.close(null)

    def emit(record):
        channel.write(nonce + " " + json.dumps(record) + "\n")
        channel.flush()

    set_limits(job["rlimits"])
    if job["mode"] == "function":
        run_function(job, emit)
    elif job["mode"] == "stdio":
        run_stdio(job, emit)
    else:  # "probe": the parent checks that sandboxes can start at all
        emit({"uid": os.getuid(), "pid": os.getpid()})
    emit({"done": True})


if sys.argv[1:2] == ["solution"]:
    serve_solution(int(sys.argv[2]), int(sys.argv[3]))
else:
    main()
