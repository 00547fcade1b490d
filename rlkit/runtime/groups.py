"""The worker groups the stage loops talk to, alike in this process and on Ray: trainer ranks (`TrainerGroup`), the
reference held by those ranks (`RanksReference`), the engines (`RolloutPool`), and each step batch sent once
(`SharedBatches`). rlkit.runtime.cluster makes the workers and wraps them here; this module imports no Ray: an actor's
methods come as `_Remote` calls that return object refs, which the group's `resolve` waits for."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

import torch

from rlkit.rollout.generations import Generations
from rlkit.rollout.vllm_engine import SyncStats
from rlkit.runtime.engine_client import EngineClient
from rlkit.training.batches import PairBatch, PolicyBatch, SFTBatch, TokenBatch, ValueBatch
from rlkit.training.packing import balance_rows
from rlkit.training.rank import Update


class _Remote:
    """An actor handle whose methods are called like a local object's and return object refs."""

    def __init__(self, handle: Any):
        self.actor = handle  # the Ray actor handle, which Cluster.release kills

    def __getattr__(self, name: str) -> Callable:
        return getattr(self.actor, name).remote


def _local_resolve(values: list) -> list:
    return values


def _as_is(batch):
    return batch


BATCH_TYPES = (TokenBatch, SFTBatch, PolicyBatch, PairBatch, ValueBatch)


class SharedBatches:
    """Each step batch in Ray's object store once: `share(batch)` puts it at its first use and gives the same object
    ref to every later call of the step (the ranks' old log-probs, the reference forward, every minibatch of the
    update), so the driver serialises a batch once rather than once per call and rank. A batch is known by
    identity: the batches are frozen dataclasses whose tensors the driver never changes once sent. The last `keep`
    are held (they stay alive and in the store until pushed out); a step sends at most three (its tokens, the
    policy's batch, the critic's)."""

    def __init__(self, put: Callable, keep: int = 4):
        self._put, self._keep = put, keep
        self._recent: list[tuple[Any, Any]] = []  # (batch, its object ref), newest first
        self._lock = threading.Lock()  # asynchronous sampling's thread may evaluate while the loop trains

    def __call__(self, value):
        if not isinstance(value, BATCH_TYPES):
            return value
        with self._lock:
            for batch, ref in self._recent:
                if batch is value:
                    return ref
            ref = self._put(value)
            self._recent = [(value, ref)] + self._recent[: self._keep - 1]
            return ref


class TrainerGroup:
    """W trainer ranks; each batch's rows are split across them in equal counts with balanced token loads (FSDP2
    ranks meet at every collective, so the step runs at the pace of the busiest). Every rank is sent the whole batch
    (on Ray: one object ref, `share`) and the row indices of its share, which it takes itself
    (rlkit.training.batches.rank_part)."""

    def __init__(self, workers: list, resolve: Callable[[list], list] = _local_resolve, share: Callable = _as_is):
        self.workers, self._resolve, self._share = workers, resolve, share
        self.placement_group = None  # on Ray: the group's reservation, removed with its actors

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def _split(self, batch) -> list[torch.Tensor] | None:
        """Row indices (b,) of each rank's share of `batch` (a step batch or a TokenBatch): equal counts, token loads
        balanced (rlkit.training.packing.balance_rows). Rows come prompt-major, so contiguous shares could give one rank all
        the long samples while the others wait on it at every FSDP2 collective. Any assignment gives the same update:
        the losses divide by a normaliser over the whole step batch. None on one rank: it takes the batch as it is."""
        if self.world_size == 1:
            return None
        tokens = getattr(batch, "tokens", batch)  # (B, L) TokenBatch
        lengths = tokens.attention_mask.sum(-1).tolist()  # (B,) real tokens per row
        shares = balance_rows(lengths, self.world_size, getattr(batch, "rows_per_unit", 1))
        return [torch.tensor(rows, dtype=torch.long) for rows in shares]

    def _each(self, batch, call: Callable, shares: list[torch.Tensor] | None) -> list:
        """call(worker, the shared batch, its rows) on every rank at once (`shares` from `_split`, rows of `batch`;
        None: the whole batch to the one rank); the ranks' results in rank order."""
        whole = self._share(batch)
        return self._resolve([call(w, whole, rows) for w, rows in zip(self.workers, shares or [None])])

    def _each_row(self, batch, call: Callable) -> torch.Tensor:
        """call's per-row results (b, ...) from every rank as one (B, ...) tensor, in the batch's own row order."""
        shares = self._split(batch)
        out = torch.cat(self._each(batch, call, shares))  # (B, ...) in rank order
        if shares is None:
            return out
        restored = torch.empty_like(out)
        restored[torch.cat(shares)] = out  # out's row k is the batch's row cat(shares)[k]
        return restored

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        return self._each_row(batch, lambda w, whole, rows: w.logprobs(whole, temperature, rows))

    def ref_logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        """The reference's log-probs (B, L-1), where the ranks hold it (ref.placement=trainer: RanksReference)."""
        return self._each_row(batch, lambda w, whole, rows: w.ref_logprobs(whole, temperature, rows))

    def step(self, loss, batch, rows: torch.Tensor | None = None, normalizer: float | None = None) -> Update:
        """One optimizer update of `loss` (rlkit.training.losses) over the step batch, or over its `rows` (a
        minibatch, whose loss divisor is `normalizer`), those rows split across the ranks. The ranks get the step
        batch itself each time, which on Ray is one object ref for all its minibatches."""
        shares = self._split(batch if rows is None else batch.select(rows))  # rows of the minibatch
        if rows is not None:
            shares = [rows] if shares is None else [rows[share] for share in shares]  # rows of the step batch
        return Update.merge(self._each(batch, lambda w, whole, part: w.step(loss, whole, part, normalizer), shares))

    def values(self, batch: TokenBatch) -> torch.Tensor:  # critic groups
        return self._each_row(batch, lambda w, whole, rows: w.values(whole, rows))

    def scores(self, batch: TokenBatch) -> torch.Tensor:  # reward model groups: (B, L) at the scored positions
        return self._each_row(batch, lambda w, whole, rows: w.scores(whole, rows))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights; every rank takes part in the gather."""
        return self._resolve([w.full_state_dict() for w in self.workers])[0]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base under a LoRA trainer (its full weights otherwise); every rank takes part."""
        return self._resolve([w.full_state_dict(merged=False) for w in self.workers])[0]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter in PEFT's layout; every rank takes part in the gather."""
        return self._resolve([w.adapter_state_dict() for w in self.workers])[0]

    def open_weight_transfer(self, connect: Callable, dtype: str) -> None:
        """Every rank opens its side of the weight transfer (`connect`: rlkit.rollout.weight_transfer's
        open_trainer_engine, its engines bound); rank 0 meets the engines. Weights stream in `dtype`."""
        self._first_then_rest([w.open_weight_transfer(connect, dtype) for w in self.workers])

    def send_weights(self, mode: str = "merged") -> float:
        """Every rank gathers the weights parameter by parameter; rank 0 sends them to the engines. Returns the MB
        sent (once, whatever the number of engines)."""
        return self._first_then_rest([w.send_weights(mode) for w in self.workers])[0]

    def _first_then_rest(self, calls: list) -> list:
        """Rank 0's result first: when it fails (an engine died), the others are stuck in a gather it left, and
        waiting on them would hang the run."""
        first = self._resolve(calls[:1])
        return first + self._resolve(calls[1:]) if len(calls) > 1 else first

    def save(self, path: str, tokenizer_path: str, recipe_yaml: str, extra: dict | None = None) -> str:
        return self._resolve([w.save(path, tokenizer_path, recipe_yaml, extra) for w in self.workers])[0]

    def save_state(self, path: str) -> list[str]:
        """Weights, optimizer, schedule and RNG for a resume point, each rank its own shard (`path` on storage every
        rank's node sees); the files the ranks wrote, relative to `path`."""
        return [name for names in self._resolve([w.save_state(path) for w in self.workers]) for name in names]

    def load_state(self, path: str) -> None:
        self._resolve([w.load_state(path) for w in self.workers])


class RanksReference:
    """The stage's frozen reference held by the policy's ranks, sharded like the policy (ref.placement=trainer), with
    ReferenceModel's interface. Its rows are split across the ranks as the policy's log-probs are."""

    def __init__(self, trainers: TrainerGroup):
        self.trainers = trainers

    def logprobs(self, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
        return self.trainers.ref_logprobs(batch, temperature)  # (B, L-1)

    def release(self) -> None:
        """Free its weights on the ranks (the ranks themselves stay: they are the policy's)."""
        self.trainers._resolve([w.drop_reference() for w in self.trainers.workers])


class RolloutPool:
    """N engines; prompts are split across them and every engine takes each weight sync."""

    def __init__(self, engines: list, resolve: Callable[[list], list] = _local_resolve, transport: str = "file",
                 timeout_s: float = 60.0, bucket_mb: float = 256.0):
        self.engines, self._resolve = engines, resolve
        self.placement_group = None  # on Ray: the pool's reservation (engines spread over the nodes)
        self.transport, self.timeout_s, self.bucket_mb = transport, timeout_s, bucket_mb  # rollout.weight_transfer
        self._source = None  # the trainer group whose rank 0 the engines' transfer group was opened with

    def generate(self, prompt_ids: list[list[int]], n: int = 1, temperature=None, max_new_tokens=None, seed=None):
        """n completions per prompt, [prompt][sample], as one Generations (flat arrays: rlkit.rollout.generations)."""
        k = len(self.engines)
        size = -(-len(prompt_ids) // k)  # ceil: contiguous chunks keep the output in prompt order
        chunks = [prompt_ids[i * size : (i + 1) * size] for i in range(k)]
        results = self._resolve(
            [e.generate(c, n, temperature, max_new_tokens, seed, i * size)  # i * size: the chunk's first prompt
             for i, (e, c) in enumerate(zip(self.engines, chunks)) if c]
        )
        return Generations.concat(results) if results else Generations.from_lists([], n)

    def sync_weights(self, state_dict: dict[str, torch.Tensor]):
        """Push weights to every engine; returns the slowest engine's SyncStats."""
        stats = self._resolve([e.sync_weights(state_dict) for e in self.engines])
        return max(stats, key=lambda s: s.seconds)

    def sync_adapter(self, tensors: dict[str, torch.Tensor], config: dict):
        """Push a LoRA adapter to every engine (served over the base it holds); returns the slowest SyncStats."""
        stats = self._resolve([e.sync_adapter(tensors, config) for e in self.engines])
        return max(stats, key=lambda s: s.seconds)

    def pull_weights(self, trainer: TrainerGroup, mode: str = "merged") -> SyncStats:
        """The engines take `trainer`'s weights straight from its rank 0 (rollout.weight_transfer: gloo, nccl, ipc):
        all of them ("merged"), or the frozen "base" under LoRA. The first pull from a group opens the transfer group
        (rank 0 and every engine worker); this process sends only the order to send. Raises WeightSyncError naming
        the engine when one dies or stalls, within rollout.sync_timeout_s."""
        if trainer is not self._source:
            counts = self._resolve([e.transfer_info() for e in self.engines])  # (workers, dtype) per engine
            client = EngineClient([getattr(e, "actor", e) for e in self.engines], [n for n, _ in counts],
                                  self.timeout_s, remote=self._resolve is not _local_resolve)
            from rlkit.rollout.weight_transfer import open_trainer_engine

            connect = functools.partial(open_trainer_engine, self.transport, client=client,
                                        world_size=1 + sum(n for n, _ in counts), timeout_s=self.timeout_s,
                                        bucket_bytes=int(self.bucket_mb * 2**20))
            trainer.open_weight_transfer(connect, counts[0][1])
            self._source = trainer
        t0 = time.perf_counter()
        megabytes = trainer.send_weights(mode)
        return SyncStats(time.perf_counter() - t0, megabytes)

    def close(self) -> None:
        self._resolve([e.close() for e in self.engines])
