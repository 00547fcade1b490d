"""Adversarial programs and math answers, each with the verdict it must get, scored the way training scores them.

Every case goes through a Scorer with reward.on_error="fail": a model-written input that made a verifier raise
(instead of scoring it wrong, or TIMEOUT when it outlasts the deadline) would stop the test as it would stop a
training run. Each hostile program is written so that it would pass (CORRECT) if its attack worked. All the
programs run as one batch through one pool, and all the answers as another, to keep this file well under a
minute on two cores. Add a row for every new attack.
"""

import os
import subprocess
import sys
import time

import pytest

from rlkit.rewards.base import Sample, Verdict
from rlkit.rewards.registry import RewardSpec
from rlkit.rewards.sandbox import _records

CANARY = "rlkit-canary-7f3a9c"  # set in the scorer's environment, so in its workers'
C, W, F, T = Verdict.CORRECT, Verdict.WRONG, Verdict.FORMAT_ERROR, Verdict.TIMEOUT

DOUBLE = {"test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2", "entry_point": "f"}
CANARY_CALL = {"test": f"def check(candidate):\n    assert candidate() == {CANARY!r}", "entry_point": "f"}


def stdio(expected: str) -> dict:
    return {"inputs": [""], "outputs": [expected]}


# Finds the harness's nonce and result channel in its frames (the solution runs in the harness's process).
FIND_CHANNEL = """
import sys
def _channel():
    frame = sys._getframe()
    while frame is not None and "nonce" not in frame.f_locals:
        frame = frame.f_back
    return frame.f_locals["nonce"], frame.f_locals["channel"]
nonce, channel = _channel()
"""

SYSCALL = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

# (id, program, gold, expected verdict)
PROGRAMS = [
    ("honest", "def f(x):\n    return 2 * x", DOUBLE, C),
    ("env-proc-environ", "import glob\nfor p in glob.glob('/proc/*/environ'):\n    try:\n        d = open(p, 'rb').read()\n"
     "    except OSError:\n        continue\n    for kv in d.split(b'\\0'):\n        if kv.startswith(b'RLKIT_CANARY='):\n"
     "            print(kv.split(b'=', 1)[1].decode())\n            raise SystemExit", stdio(CANARY), W),
    ("env-proc1-in-exception", "def f():\n    env = open('/proc/1/environ', 'rb').read().split(b'\\0')\n"
     "    raise ValueError([kv for kv in env if b'CANARY' in kv])", CANARY_CALL, W),
    ("env-os-environ", "import os\ndef f():\n    return os.environ.get('RLKIT_CANARY')", CANARY_CALL, W),
    ("forged-deep-json", FIND_CHANNEL + "channel.write(nonce + ' ' + '[' * 100000 + ']' * 100000 + '\\n')\n"
     "channel.flush()\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("forged-bad-values", FIND_CHANNEL + "channel.write(nonce + ' {\"assert\": 0, \"values\": 5}\\n')\n"
     "channel.flush()\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("forged-not-json", FIND_CHANNEL + "channel.write(nonce + ' {not json\\n')\nchannel.flush()\n"
     "def f(x):\n    return 2 * x", DOUBLE, W),
    ("forged-done-then-exit", FIND_CHANNEL + "channel.write(nonce + ' {\"done\": true}\\n')\nchannel.flush()\n"
     "import os\nos._exit(0)\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("huge-output", "def f(x):\n    return [x] * 10_000_000 if x == 2 else 2 * x", DOUBLE, W),
    ("stdout-flood", "import sys\nsys.stdout.write('4\\n' * 5_000_000)", stdio("4"), W),
    ("fork-bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", stdio(""), W),
    ("vsock", "import socket\ndef f(x):\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()\n    return 2 * x",
     DOUBLE, W),
    ("network", "import socket\ndef f(x):\n    socket.create_connection(('1.1.1.1', 53), timeout=1).close()\n"
     "    return 2 * x", DOUBLE, W),
    ("write-outside-tmp", "def f(x):\n    open('/usr/rlkit-pwned', 'w').write('x')\n    return 2 * x", DOUBLE, W),
    ("read-parents-files", "print(open(" + repr(os.path.abspath(__file__)) + ").read(), end='')",
     stdio(open(__file__).read()), W),
    ("kill-everything", "import os, signal\nfor pid in range(1, 200):\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
     "    except OSError:\n        pass\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("infinite-loop", "def f(x):\n    while True:\n        pass", DOUBLE, W),
    ("memory-bomb", "def f(x):\n    b = bytearray(1 << 40)\n    return 2 * x", DOUBLE, W),
    ("exit-before-asserts", "import os\nos._exit(0)", DOUBLE, W),
    ("sys-exit-in-call", "import sys\ndef f(x):\n    sys.exit(0)", DOUBLE, W),
    ("always-equal", "class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()", DOUBLE, W),
    ("patched-json", "import json\njson.dumps = lambda *a, **k: '{\"done\": true}'\ndef f(x):\n    return 0", DOUBLE, W),
    ("huge-program", "def f(x):\n    return 2 * x\n" + "# padding\n" * 40_000, DOUBLE, W),
    ("deep-parens", "def f(x):\n    return " + "(" * 5000 + "2 * x" + ")" * 5000, DOUBLE, W),
    ("daemon-child", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
     "def f(x):\n    return 2 * x", DOUBLE, C),
    # seccomp: each passes only when the filter answered (io_uring_setup: ENOSYS 38; the x32 ABI: EPERM 1)
    ("io-uring", SYSCALL + "r = libc.syscall(425, 1, ctypes.create_string_buffer(120))\nE = ctypes.get_errno()\n"
     "def f(x):\n    return 2 * x if (r, E) == (-1, 38) else 0", DOUBLE, C),
    ("x32-socket", SYSCALL + "r = libc.syscall(41 | 0x40000000, 40, 1, 0)\nE = ctypes.get_errno()\n"
     "def f(x):\n    return 2 * x if (r, E) == (-1, 1) else 0", DOUBLE, C),
    # issue 33: the harness in the solution's process, the sandbox's init, memory filesystems, other processes
    ("forge-passing-records", FIND_CHANNEL + "for r in ('{\"assert\": 0, \"values\": [4]}', '{\"assert\": 1, "
     "\"values\": [-2]}', '{\"done\": true}'):\n    channel.write(nonce + ' ' + r + '\\n')\nchannel.flush()\n"
     "import os\nos._exit(0)", DOUBLE, W),
    ("replace-exec-builtin", FIND_CHANNEL + "import builtins, os\ndef fake(*a, **k):\n    for r in ('{\"assert\": 0, "
     "\"values\": [4]}', '{\"assert\": 1, \"values\": [-2]}'):\n        channel.write(nonce + ' ' + r + '\\n')\n"
     "builtins.exec = fake\ndef f(x):\n    return 0", DOUBLE, W),
    ("read-job-via-proc1", "d = open('/proc/1/fd/0', 'rb').read()\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("write-checker-memory", "open('/proc/1/mem', 'r+b')\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("steal-result-channel", "import os\nfd = os.open('/proc/1/fd/3', os.O_WRONLY)\ndef f(x):\n    return 2 * x",
     DOUBLE, W),
    ("ptrace-init", SYSCALL + "r = libc.ptrace(16, 1, 0, 0)\ndef f(x):\n    return 2 * x if r == 0 else 0", DOUBLE, W),
    ("process-vm-readv", SYSCALL + "import os\nb = ctypes.create_string_buffer(8)\n"
     "iov = (ctypes.c_void_p * 2)(ctypes.addressof(b), 8)\n"
     "r = libc.process_vm_readv(os.getpid(), iov, 1, iov, 1, 0)\ndef f(x):\n    return 2 * x if r == 8 else 0",
     DOUBLE, W),
    ("dev-shm-outside-memory", "import os\nfor i in range(20):\n    with open(f'/dev/shm/{i}', 'wb') as fh:\n"
     "        fh.write(b'x' * (15 << 20))\ndef f(x):\n    return 2 * x", DOUBLE, W),
    ("dev-outside-memory", "with open('/dev/hold', 'wb') as fh:\n    fh.write(b'x' * (15 << 20))\n"
     "def f(x):\n    return 2 * x", DOUBLE, W),
    ("memfd-outside-memory", "import os\nfd = os.memfd_create('hold')\nos.write(fd, b'x' * (15 << 20))\n"
     "def f(x):\n    return 2 * x", DOUBLE, W),
    ("sysv-shm-outside-memory", SYSCALL + "r = libc.shmget(0, 1 << 30, 0o1600)\n"
     "def f(x):\n    return 2 * x if r >= 0 else 0", DOUBLE, W),
    ("kill-the-checker", "import os, signal\nfor s in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n"
     "    os.kill(1, s)\ndef f(x):\n    return 2 * x", DOUBLE, C),  # pid 1 ignores them: an honest run
    ("forged-reply-pipe", "import sys, os\nos.write(int(sys.argv[3]), b'{\"value\": 4}\\n{\"value\": -2}\\n')\n"
     "def f(x):\n    return 0", DOUBLE, W),
    ("hash-colliding-reply", "import sys, os, json\nM = 2 ** 61 - 1\n"
     "os.write(int(sys.argv[3]), json.dumps({'value': {'set': [k * M for k in range(20000)]}}).encode() + b'\\n')\n"
     "def f(x):\n    return 2 * x", DOUBLE, W),
    ("stderr-noise", "import sys\nsys.stderr.write('x' * 1_000_000)\ndef f(x):\n    return 2 * x", DOUBLE, C),
]

# (id, completion, gold, expected verdict)
ANSWERS = [
    ("hedge-two-boxes", "\\boxed{1} or \\boxed{2}", "2", W),
    ("hedge-two-boxes-reversed", "\\boxed{2} or \\boxed{1}", "2", W),
    ("hedge-hashes", "#### 1\n#### 2", "2", W),
    ("hedge-answer-tags", "<answer>1</answer> <answer>2</answer>", "2", W),
    ("hedge-box-and-hashes", "\\boxed{2}\n#### 3", "2", W),
    ("hedge-fbox-and-box", "\\fbox{1} \\boxed{2}", "2", W),
    ("hedge-lor", "\\boxed{1 \\lor 2}", "2", W),
    ("hedge-vee", "\\boxed{2 \\vee 3}", "2", W),
    ("hedge-text-or", "\\boxed{x = 2 \\text{ or } x = 1}", "2", W),
    ("hedge-list", "\\boxed{1, 2}", "2", W),
    ("hedge-many-boxes", "".join(f"\\boxed{{{i}}}" for i in range(1, 6)), "5", W),
    ("restated-answer", "\\boxed{2}, so again \\boxed{2}\n#### 2", "2", C),
    ("restated-equal-forms", "\\boxed{0.5}, that is \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", C),
    ("think-is-ignored", "<think>\\boxed{1}</think> so \\boxed{2}", "2", C),
    ("power-tower", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "4", T),
    ("power-tower-10", "\\boxed{10^{10^{10}}}", "4", T),
    ("huge-factorial", "\\boxed{100000000!}", "4", T),
    ("factorial", "\\boxed{10000!}", "4", W),
    ("deep-braces", "\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}", "1", W),
    ("deep-parens", "\\boxed{" + "(" * 500 + "4" + ")" * 500 + "}", "4", W),
    ("megabyte", "\\boxed{" + "x+" * 300_000 + "1}", "4", W),
    ("long-number-wrong", "\\boxed{" + "1" * 5000 + "}", "4", W),
    ("long-number-right", "\\boxed{" + "9" * 3000 + "}", "9" * 3000, C),
    ("arabic-indic-digit", "\\boxed{\u0664}", "4", C),  # the same number, in another script
    ("fullwidth-digit", "\\boxed{\uff14}", "4", C),
    ("latex-text", "\\boxed{\\text{2}}", "2", C),
    ("latex-phantom", "\\boxed{2\\phantom{3}}", "2", W),
    ("latex-infinity", "\\boxed{\\infty}", "4", W),
    ("no-answer", "I am not sure.", "4", F),
    ("question-copied-back", "#### 2+63", "65", W),  # math-verify would evaluate it to the gold
    ("product-left-undone", "\\boxed{7 \\times 8}", "56", W),
    ("fraction-is-an-answer", "\\boxed{1/2}", "0.5", C),
    # issue 33, rewarded though wrong: negation and hedges without a marker (R4)
    ("negated-last-number", "The answer is not 42.", "42", W),
    ("negated-isnt", "So the total isn't 42.", "42", W),
    ("or-candidates", "The answer is 41 or 42.", "42", W),
    ("either-or", "It is either 41 or 42", "42", W),
    ("lor-in-prose", "So x = 41 \\lor x = 42", "42", W),
    ("unicode-or", "Final: 41 ∨ 42", "42", W),
    ("equation-two-numbers", "Therefore 41 = 42.", "42", W),
    ("boxed-equation-two-numbers", "\\boxed{41 = 42}", "42", W),
    # merged or mangled numbers (R7)
    ("list-read-as-one", "\\boxed{1, 2}", "12", W),
    ("list-no-space", "#### 1,2", "12", W),
    ("leading-dot", "\\boxed{.5}", "5", W),
    ("underscore-digits", "\\boxed{10_2}", "102", W),
    ("ten-digits-off-by-one", "\\boxed{1234567891}", "1234567890", W),
    ("twenty-digits-off-by-one", "\\boxed{12345678901234567891}", "12345678901234567890", W),
    # arithmetic left undone, disguised (R6)
    ("undone-x-prefix", "\\boxed{x = 2+63}", "65", W),
    ("undone-thin-space", "\\boxed{2\\,+\\,63}", "65", W),
    ("undone-unicode-dot", "\\boxed{7 ⋅ 8}", "56", W),
    ("undone-unicode-times-spaces", "#### 7\u2009×\u20098", "56", W),
    # hedges far back, corrections after, markers quoted (R1-R3)
    ("hedge-before-16-boxes", "\\boxed{1}" + "\\boxed{2}" * 16, "2", W),
    ("correction-after-box", "\\boxed{42}. Wait, I made a mistake: it is 41.", "42", W),
    ("correction-before-box-is-fine", "Wait, 41 was wrong. \\boxed{42}", "42", C),
    ("quoted-box", 'The hint says "\\boxed{42}", but I get 41.', "42", W),
    ("quoted-hashes-only", 'The expected format is "#### 42".', "42", F),
    # issue 33, judged wrong though right (lost signal)
    ("heading-then-box", "#### Step 1: Add\n3 + 4 = 7\n#### Step 2: Double\n\\boxed{14}", "14", C),
    ("bold-heading-then-number", "#### **Solution**\nShe pays 3 * 4 = 12 dollars.", "12", C),
    ("not-the-other", "The answer is 42, not 43.", "42", C),
    ("unit-word-in-box", "\\boxed{42 apples}", "42", C),
    ("unit-word-after-hashes", "#### 42 dollars", "42", C),
    ("thin-space-thousands", "\\boxed{1\\,234}", "1234", C),
    ("narrow-nbsp-thousands-prose", "The total is 1\u202f234.", "1234", C),
    ("fullwidth-thousands", "\\boxed{１，２３４}", "1234", C),
    ("scientific-times-ten", "\\boxed{1.2 \\times 10^{6}}", "1200000", C),
    ("money-and-cents", "#### $1,234.50", "1234.5", C),
    ("percent", "\\boxed{50\\%}", "50", C),
    # cost: linear whatever the reply (R1)
    ("unclosed-answer-tags", "<answer>" * 30_000 + " 42", "42", C),
    ("nested-boxes", "\\boxed{" * 20_000 + "4" + "}" * 20_000, "4", W),
    ("ten-thousand-boxes", "\\boxed{4}" * 10_000, "4", W),
]


@pytest.fixture(scope="module")
def canary_env():
    os.environ["RLKIT_CANARY"] = CANARY  # the workers are spawned with this environment
    yield
    os.environ.pop("RLKIT_CANARY", None)


def score_all(rewards, rows, timeout_s):
    from rlkit.rewards.scorer import Scorer, ScorerConfig  # imported here so the canary is set before any worker starts

    cfg = ScorerConfig(rewards=rewards, timeout_s=timeout_s, num_workers=2, on_error="fail")
    with Scorer(cfg) as scorer:
        start = time.perf_counter()
        out = scorer.score([Sample("q", completion, gold) for _, completion, gold, _ in rows])
        elapsed = time.perf_counter() - start
    return out, elapsed


@pytest.fixture(scope="module")
def programs(canary_env):
    spec = RewardSpec(name="code", kwargs={"wall_s": 2.0, "processes": 16})
    return score_all([spec], PROGRAMS, timeout_s=4.0)


@pytest.fixture(scope="module")
def answers():
    spec = RewardSpec(name="math", kwargs={"verify_timeout_s": 1})
    return score_all([spec], ANSWERS, timeout_s=3.0)


@pytest.mark.parametrize("i", range(len(PROGRAMS)), ids=[row[0] for row in PROGRAMS])
def test_program(programs, i):
    out, _ = programs
    name, _, _, expected = PROGRAMS[i]
    result = out.results[i]
    assert result.verdict == expected, (name, result.info)
    assert CANARY not in repr(result.info)  # nothing from the trainer's environment comes back in the info


@pytest.mark.parametrize("i", range(len(ANSWERS)), ids=[row[0] for row in ANSWERS])
def test_answer(answers, i):
    out, _ = answers
    name, _, _, expected = ANSWERS[i]
    assert out.results[i].verdict == expected, (name, out.results[i].info)


def test_the_suite_is_big_enough_and_fast(programs, answers):
    assert len(PROGRAMS) >= 20 and len(ANSWERS) >= 20
    assert programs[1] < 30 and answers[1] < 30


def test_model_timeouts_score_wrong_and_are_counted_apart(answers):
    out, _ = answers
    n_timeouts = sum(row[3] == T for row in ANSWERS)  # 3
    assert out.stats["timeouts"] == n_timeouts and out.stats["errors"] == 0 and out.stats["excluded"] == 0
    assert all(out.valid)
    # a timeout scores as MathReward's wrong answer (0.0), kept in the loss
    assert [out.scores[i] for i, row in enumerate(ANSWERS) if row[3] == T] == [0.0] * n_timeouts


ZOMBIE_CHECK = """
import os
from rlkit.rewards.sandbox import Sandbox, SandboxLimits, become_subreaper
become_subreaper()  # what a scorer worker does
sandbox = Sandbox(SandboxLimits(wall_s=2.0))
for code in ("print(1)", "while True: pass"):
    sandbox.run({"mode": "stdio", "code": code, "inputs": [""], "test_timeout_s": 1, "max_stdout": 64})
pid = os.getpid()
children = open(f"/proc/{pid}/task/{pid}/children").read().split()
print(sum(open(f"/proc/{c}/stat").read().rsplit(") ", 1)[1][0] == "Z" for c in children), len(children))
"""


def test_no_zombies_are_left_behind():
    # in a process of its own: becoming a subreaper is for the scorer's workers, not for pytest
    done = subprocess.run([sys.executable, "-c", ZOMBIE_CHECK], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["0", "0"], done.stderr[-2000:]


def test_records_parse_with_bounded_depth():
    # hand-made channel contents: a good record, then forged lines carrying the nonce
    ok, malformed = _records(b'n {"done": true}\n', "n")
    assert ok == [{"done": True}] and not malformed
    for forged in (b"[" * 100_000, b"[1, 2]", b"{nope", b'{"a": ' * 300 + b"1" + b"}" * 300):
        records, malformed = _records(b'n {"done": true}\nn ' + forged + b"\n", "n")
        assert malformed, forged[:20]
    # a deep-looking string is not nesting
    assert _records(b'n {"s": "' + b"[" * 1000 + b'"}\n', "n") == ([{"s": "[" * 1000}], False)
