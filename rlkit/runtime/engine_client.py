"""The engines as trainer rank 0 sees them during a weight transfer: vLLM's weight-sync client (`VLLMWeightSyncClient`)
over a pool's engines, in this process or as Ray actors (rlkit.runtime.cluster makes it; it travels to rank 0's
actor). Each call reaches every engine at once and is bounded by rollout.sync_timeout_s; a failure is one
WeightSyncError naming the engine, the dead one first.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable

from rlkit.rollout.vllm_engine import WeightSyncError


class EngineClient:
    """vLLM's weight-sync client (`VLLMWeightSyncClient`: init, start, update, finish) over a pool's engines: trainer
    rank 0 drives them through it while it sends. Each call goes to every engine at once and waits for all, bounded
    by rollout.sync_timeout_s; a failure is one WeightSyncError naming the engine. Picklable: on Ray it holds the
    engines' actor handles and travels to rank 0's actor."""

    def __init__(self, engines: list, workers: list[int], timeout_s: float, remote: bool):
        self.engines, self.workers, self.timeout_s, self.remote = engines, workers, timeout_s, remote

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        offsets = [init_info["rank_offset"] + sum(self.workers[:i]) for i in range(len(self.engines))]
        self._all(lambda i, e: e.init_weight_transfer_engine, lambda i: (init_info | {"rank_offset": offsets[i]},))

    def start_weight_update(self) -> None:
        self._all(lambda i, e: e.start_weight_update)

    def update_weights(self, update_info) -> None:
        self._all(lambda i, e: e.update_weights, lambda i: (update_info,))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all(lambda i, e: e.finish_weight_update, lambda i: (weight_version,))

    def _all(self, method: Callable, args: Callable = lambda i: ()) -> None:
        deadline = time.monotonic() + self.timeout_s + 5.0  # the engine's own deadline fires first
        if self.remote:
            import ray

            pending = [method(i, e).remote(*args(i)) for i, e in enumerate(self.engines)]
        else:
            pool = concurrent.futures.ThreadPoolExecutor(len(self.engines), thread_name_prefix="engine-client")
            pending = [pool.submit(method(i, e), *args(i)) for i, e in enumerate(self.engines)]
            pool.shutdown(wait=False)
        errors = []
        for i, item in enumerate(pending):
            left = max(0.0, deadline - time.monotonic())
            try:
                ray.get(item, timeout=left) if self.remote else item.result(timeout=left)
            except Exception as e:
                errors.append(_engine_error(i, e, self.timeout_s))
        if errors:  # a dead engine first: the others fail because it left the group
            dead = [i for i, alive in enumerate(self._alive()) if not alive]
            if dead:
                raise WeightSyncError(f"rollout engine {dead[0]} died during the weight transfer "
                                      f"(rollout.weight_transfer); the run cannot go on without it") from errors[0]
            raise errors[0]

    def _alive(self) -> list[bool]:
        """Which engines still run (asked at once; an actor that is gone, or does not answer in time, is not)."""
        if not self.remote:
            with concurrent.futures.ThreadPoolExecutor(len(self.engines)) as pool:
                return list(pool.map(lambda e: e.alive(), self.engines))
        import ray

        refs, alive = [e.alive.remote() for e in self.engines], []
        for ref in refs:
            try:
                alive.append(bool(ray.get(ref, timeout=10.0)))
            except Exception:  # RayActorError: the actor died with its engine; a timeout: it is stuck
                alive.append(False)
        return alive


def _engine_error(i: int, e: Exception, timeout_s: float):
    """One line: the engine, what happened to it, and the first line of what it reported."""
    causes, cause = [], e
    while cause is not None and len(causes) < 8:
        causes, cause = causes + [type(cause).__name__], cause.__cause__
    if {"RayActorError", "ActorDiedError", "EngineDeadError"} & set(causes):
        what = "died during the weight transfer"
    elif {"TimeoutError", "GetTimeoutError"} & set(causes):
        what = f"did not answer within rollout.sync_timeout_s={timeout_s}s"
    else:
        what = "failed the weight transfer"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    error = WeightSyncError(f"rollout engine {i} {what}: {first}")
    error.__cause__ = e
    return error
