"""Killable worker processes that run rewards on chunks of samples, with a hard deadline per sample.

The scorer hands each worker a chunk of samples in one message and gets the chunk's results back in one
message (no round trip per sample on the hot path). Per-sample deadlines still hold: before each sample the
worker writes (position in chunk, start time) to a small shared array, so the parent knows which sample is
running and since when. Past `timeout_s` the parent kills the worker, marks that sample TIMEOUT, requeues the
rest of the chunk and starts a replacement in the background; the other workers keep going meanwhile.

Workers are started with "spawn": the parent may hold torch threads and a vLLM engine, which fork would copy
in a broken state.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Callable

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.registry import RewardSpec, build_reward
from rlkit.rewards.sandbox import become_subreaper

STARTUP_TIMEOUT_S = 120.0  # importing a user's reward module (and sympy) can take a while on a busy host

# Per sample: one RewardResult per reward, in the recipe's order.
Outcome = list[RewardResult]


def score_one(rewards: list, sample: Sample) -> Outcome:
    """Every reward's result on one sample; an exception becomes an ERROR result carrying its message."""
    out = []
    for reward in rewards:
        try:
            result = reward.score(sample)
            if not isinstance(result, RewardResult):
                raise TypeError(f"score() returned {type(result).__name__}, expected RewardResult")
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # SystemExit too; reported to the parent and counted, never a silent 0
            result = RewardResult(0.0, Verdict.ERROR, info={"error": f"{type(e).__name__}: {e}"[:1000]})
        out.append(result)
    return out


def _serve(conn, specs: list[RewardSpec], progress) -> None:
    """Worker main: build the rewards once, then score chunks until told to stop or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    become_subreaper()  # the sandboxes' orphaned pid 1s come back to us to reap (see Sandbox._kill)
    try:
        rewards = [build_reward(spec, i) for i, spec in enumerate(specs)]
        for reward in rewards:  # slow imports happen now, not inside the first sample's deadline
            if callable(getattr(reward, "warmup", None)):
                reward.warmup()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", ""))
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent died: nothing left to do
            return
        if chunk is None:
            return
        out = []
        for position, sample in enumerate(chunk):
            progress[1] = time.monotonic()  # start time first, so a stale position never gets a fresh clock
            progress[0] = position
            out.append(score_one(rewards, sample))
        try:
            conn.send(out)
        except Exception:  # an unpicklable info value from a user reward; pickling fails before any byte is sent
            conn.send([[_plain(r) for r in outcome] for outcome in out])


def _plain(result: RewardResult) -> RewardResult:
    info = {str(k): repr(v) for k, v in result.info.items()}
    return RewardResult(float(result.score), Verdict(result.verdict), dict(result.components), info)


class _Worker:
    """One worker process and the chunk it is running (`task`: sample indices, or None when idle)."""

    def __init__(self, ctx, specs: list[RewardSpec]):
        self.progress = ctx.RawArray("d", 2)  # (position in chunk, monotonic start time of that sample)
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, specs, self.progress), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.task: list[int] | None = None

    def start(self, task: list[int], samples: list[Sample]) -> None:
        self.progress[0], self.progress[1] = 0.0, time.monotonic()
        self.task = task
        self.conn.send([samples[i] for i in task])

    def deadline(self, timeout_s: float) -> float:
        if not self.ready:
            return self.started + STARTUP_TIMEOUT_S
        return self.progress[1] + timeout_s

    def running(self) -> int:
        """The index of the sample being scored now."""
        assert self.task is not None
        return self.task[min(int(self.progress[0]), len(self.task) - 1)]

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


def fault(verdict: Verdict, message: str, n_rewards: int) -> Outcome:
    return [RewardResult(0.0, verdict, info={"error": message}) for _ in range(n_rewards)]


class WorkerPool:
    """`num_workers` reward processes; `run(samples)` returns one Outcome per sample, in order."""

    def __init__(self, specs: list[RewardSpec], num_workers: int, timeout_s: float):
        self.specs, self.timeout_s = specs, timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, specs) for _ in range(num_workers)]  # all start in parallel
        while not all(w.ready for w in self._workers):
            self._step(lambda *_: None, deque())

    def run(self, samples: list[Sample]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(samples)
        queue = deque(_chunks(len(samples), len(self._workers)))

        def record(index: int, outcome: Outcome) -> None:
            results[index] = outcome

        while queue or any(w.task is not None for w in self._workers):
            self._step(record, queue, samples)
        return results  # type: ignore[return-value]

    def _step(self, record: Callable[[int, Outcome], None], queue: deque, samples: list[Sample] = ()):
        """Hand out chunks, wait for the next result or deadline, and settle whatever is due."""
        for slot, worker in enumerate(self._workers):
            if worker.ready and worker.task is None and queue:
                task = queue.popleft()
                try:
                    worker.start(task, samples)
                except OSError:  # it died while idle (e.g. the OOM killer): replace it, keep the chunk
                    queue.appendleft(task)
                    worker.kill()
                    self._workers[slot] = _Worker(self._ctx, self.specs)
        waiting = [w for w in self._workers if w.task is not None or not w.ready]
        if not waiting:
            return
        nearest = min(w.deadline(self.timeout_s) for w in waiting)
        readable = wait([w.conn for w in waiting], timeout=max(0.0, nearest - time.monotonic()))
        for slot, worker in enumerate(self._workers):
            if worker not in waiting:
                continue
            if worker.conn in readable or worker.conn.poll(0):  # poll: a result that landed just now
                self._receive(slot, record, queue)
            elif time.monotonic() >= worker.deadline(self.timeout_s):
                self._expire(slot, record, queue)

    def _receive(self, slot: int, record, queue: deque) -> None:
        worker = self._workers[slot]
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the process died, e.g. a reward called os._exit or was OOM-killed
            if not worker.ready:
                self._startup_failed(worker, "the process ended")
            self._settle_culprit(slot, Verdict.ERROR, "reward worker died", record, queue)
            return
        if not worker.ready:
            status, detail = message
            if status != "ready":
                self._startup_failed(worker, detail)
            worker.ready = True
            return
        for index, outcome in zip(worker.task, message):
            record(index, outcome)
        worker.task = None

    def _expire(self, slot: int, record, queue: deque) -> None:
        worker = self._workers[slot]
        if not worker.ready:
            self._startup_failed(worker, f"not ready within {STARTUP_TIMEOUT_S:.0f}s")
        self._settle_culprit(slot, Verdict.TIMEOUT, f"no result within {self.timeout_s}s", record, queue)

    def _settle_culprit(self, slot: int, verdict: Verdict, message: str, record, queue: deque) -> None:
        """The running sample gets the fault; the rest of its chunk goes back to the front of the queue."""
        worker = self._workers[slot]
        culprit = worker.running()
        record(culprit, fault(verdict, message, len(self.specs)))
        rest = [i for i in worker.task if i != culprit]
        if rest:
            queue.appendleft(rest)
        worker.kill()
        self._workers[slot] = _Worker(self._ctx, self.specs)  # becomes usable once it reports ready

    def _startup_failed(self, worker: _Worker, detail: str):
        worker.process.join(1)
        self.close()
        raise RuntimeError(f"a reward worker failed to start: {detail} (exit code {worker.process.exitcode}; "
                           "its traceback, if any, is on stderr)")

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):  # already closed or dead
                pass
            worker.kill()
        self._workers = []


def _chunks(n: int, num_workers: int) -> list[list[int]]:
    """About four chunks per worker: few messages, yet a slow chunk does not leave the others idle."""
    size = max(1, -(-n // (num_workers * 4)))
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]
