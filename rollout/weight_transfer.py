"""Weights straight from trainer rank 0 to every engine worker, through vLLM's weight-transfer API.

vLLM (0.32) splits a transfer in two halves that meet in one process group: a `TrainerWeightTransferEngine` on the
trainer ranks (rank 0 sends; the others only join the FSDP2 gathers) and a `WeightTransferEngine` in each engine
worker, which receives and calls the model's `load_weights`. Rank 0 drives the engines through a small client
(init, start, update, finish: rlkit.runtime.cluster's `EngineClient`): names, shapes and dtypes travel there, the
bytes travel in the group. The driver only tells the ranks to send; no weight passes through it.

Backends (`rollout.weight_transfer`):
- `nccl`, `ipc`: vLLM's own engines, for GPUs (an NCCL group of rank 0 and every engine's tensor-parallel workers;
  CUDA IPC for an engine sharing the trainer's GPU);
- `gloo`: ours, for CPUs, the same protocol over a gloo group of its own (its own TCPStore on rank 0's node, never
  the trainer's default process group), so CPU runs and tests go through the code GPU runs take. The engine side is
  registered with vLLM's `WeightTransferEngineFactory` when a worker imports this module, which vLLM does because
  VllmRollout names `GlooWorkerExtension` as its `worker_extension_cls`.
Every wait on either side is bounded by `timeout_s` (rollout.sync_timeout_s): a dead or stalled peer is an error.
"""

from __future__ import annotations

import concurrent.futures
import os
import traceback
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, Iterator

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   WeightSource, WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from rlkit.rollout.vllm_engine import WeightSyncError

TRANSPORTS = ("gloo", "nccl", "ipc")  # through this module; "file" is VllmRollout.sync_weights
_STORE_PREFIX = "rlkit-weights"


class GlooWorkerExtension:
    """Named as vLLM's `worker_extension_cls` so that every engine worker imports this module, which registers the
    gloo engine with vLLM's factory before the worker builds its weight-transfer engine. It adds no method."""


# -- the wire: one gloo broadcast per bucket, a bucket one flat uint8 buffer ------------------------------------
def open_group(address: str, port: int, rank: int, world_size: int, timeout_s: float, store=None):
    """A gloo process group of its own (not torch.distributed's default one): trainer rank 0 at rank 0, which holds
    the TCPStore, and the engine workers after it. Returns (group, store)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    timeout = timedelta(seconds=timeout_s)
    if store is None:
        store = TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    return ProcessGroupGloo(PrefixStore(_STORE_PREFIX, store), rank, world_size, timeout), store


def broadcast(group, buffer: torch.Tensor, timeout_s: float) -> None:
    """Rank 0's `buffer` into every member's; raises past `timeout_s` or when a member is gone."""
    from torch.distributed import BroadcastOptions

    opts = BroadcastOptions()
    opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, timedelta(seconds=timeout_s)
    group.broadcast([buffer], opts).wait()


def close_group(group) -> None:
    """Drop a group's connections now (a failed transfer): members still waiting in a broadcast fail at once rather
    than at their timeout. A traceback that holds the group would otherwise keep them open."""
    if group is None:
        return
    for method in ("abort", "shutdown"):
        try:
            getattr(group, method)()
            return
        except Exception:  # a backend without it: try the next
            continue


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The bucket's tensors' bytes end to end, (sum of nbytes,) uint8."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, names: list[str], dtypes: list[torch.dtype],
           shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
    """`pack`'s inverse: views of `buffer` as the named tensors."""
    sizes = [torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, dtypes)]
    return [(n, part.view(d).view(s)) for n, d, s, part in zip(names, dtypes, shapes, buffer.split(sizes))]


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[int]:
    """How many consecutive tensors each bucket holds: tensors join a bucket while it stays within `bucket_bytes`;
    a larger tensor goes alone.

    >>> plan_buckets([4, 4, 4, 10, 1], 8)
    [2, 1, 1, 1]
    """
    counts, used = [], 0
    for size in sizes:
        if counts and used + size <= bucket_bytes:
            counts[-1] += 1
            used += size
        else:
            counts.append(1)
            used = size
    return counts


# -- the engine worker's half -----------------------------------------------------------------------------------
@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # this engine's first worker's rank in the group (rank 0 is the trainer)
    world_size: int
    timeout_s: float


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_counts: list[int]  # tensors per broadcast buffer, in order (plan_buckets)


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives the trainer's buckets over gloo and loads each into the model as it lands (vLLM's layerwise reload,
    as its NCCL engine does: processed per layer once all its weights are in)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group = self.store = None
        self.timeout_s = 60.0

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        p = self.parallel_config  # each tensor-parallel worker at its own rank; it loads its shard of each tensor
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank
        self.timeout_s = init_info.timeout_s
        self.group, self.store = open_group(init_info.master_address, init_info.master_port, rank,
                                            init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # the base class syncs unconditionally, which a CPU has nothing for
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        u, start = update_info, 0
        dtypes = [getattr(torch, d) for d in u.dtype_names]
        names = list(u.names)
        if getattr(self.model_config.hf_text_config, "tie_word_embeddings", False):
            # A tied embedding comes once, under the embedding's name; loaded under it, vLLM restores its LM head
            # unprocessed and on CPU the prepacked copy its logits GEMM reads stays stale. Loaded as the LM head it
            # is repacked and copied into the Parameter the embedding shares (VllmRollout.sync_weights does the same).
            names = ["lm_head.weight" if n == "model.embed_tokens.weight" else n for n in names]
        try:
            with disable_mtp_completeness_check():
                for count in u.bucket_counts:
                    end = start + count
                    part, kinds, shapes = names[start:end], dtypes[start:end], u.shapes[start:end]
                    size = sum(torch.Size(s).numel() * d.itemsize for s, d in zip(shapes, kinds))
                    buffer = torch.empty(size, dtype=torch.uint8)
                    broadcast(self.group, buffer, self.timeout_s)
                    self.model.load_weights(unpack(buffer.to(self.device), part, kinds, shapes))
                    start = end
        except BaseException:
            # the transfer broke off (the trainer or another engine died): end the layerwise reload so the model is
            # whole again (layers not reached keep their weights), ready for the next full sync
            self.finish_weight_update()
            self.shutdown()
            raise

    def shutdown(self) -> None:
        close_group(self.group)
        self.group = self.store = None


# -- the trainer's half -----------------------------------------------------------------------------------------
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "gloo"

    master_address: str  # rank 0's node, where it opens the group's store
    world_size: int  # 1 + every engine worker
    timeout_s: float = 60.0
    bucket_bytes: int = 256 * 2**20
    master_port: int = 0  # 0: a port free on rank 0's node, chosen by the store itself


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side of `gloo`: every rank gathers the stream's parameters; rank 0 packs them into buckets and
    broadcasts each while the engines receive (their `update_weights` runs meanwhile on a side thread)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source: WeightSource, is_sender: bool, timeout_s: float, bucket_bytes: int):
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.timeout_s, self.bucket_bytes = timeout_s, bucket_bytes
        self.group = self.store = None
        self.bytes_sent = 0  # by the last send_weights, once whatever the number of engines

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source: WeightSource | None = None):
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, timeout_s=init_info.timeout_s,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        from torch.distributed import TCPStore

        store = TCPStore(init_info.master_address, init_info.master_port, init_info.world_size, is_master=True,
                         timeout=timedelta(seconds=init_info.timeout_s), wait_for_workers=False)
        worker = GlooInitInfo(init_info.master_address, store.port, 1, init_info.world_size, init_info.timeout_s)
        # the workers block in init until every member has joined: they join on a side thread while rank 0 does
        engine._both(lambda: client.init_weight_transfer_engine(asdict(worker)), lambda: engine._join(init_info, store))
        return engine

    def _join(self, init_info: GlooTrainerInitInfo, store) -> None:
        self.group, self.store = open_group(init_info.master_address, store.port, 0, init_info.world_size,
                                            init_info.timeout_s, store)

    def send_weights(self) -> None:
        counts = plan_buckets([m.dtype.itemsize * torch.Size(m.shape).numel() for m in self.source.metadata()],
                              self.bucket_bytes)
        buckets = _buckets(iter(self.source), counts)
        if not self.is_sender:  # gathers only: each parameter is a collective among the trainer ranks
            for _ in buckets:
                pass
            return
        meta = self.source.metadata()
        info = GlooUpdateInfo([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                              [list(m.shape) for m in meta], counts)
        self.client.start_weight_update()
        self.bytes_sent = 0

        def send() -> None:
            for bucket in buckets:
                buffer = pack([t for _, t in bucket])
                broadcast(self.group, buffer, self.timeout_s)
                self.bytes_sent += buffer.numel()

        self._both(lambda: self.client.update_weights(asdict(info)), send)
        self.client.finish_weight_update()

    def _both(self, engines, trainer) -> None:
        """Run the engines' side (a client call, which blocks until they have received) and rank 0's side at once,
        each bounded. On a failure the group is dropped, so that members still waiting fail now rather than at
        their own timeout, and the error raised is the engines' when they report one (it names the engine)."""
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-transfer-rpc")
        future = pool.submit(engines)
        try:
            trainer()
            future.result(timeout=self.timeout_s)
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # they hold the group, which must go now to release the engines
            self.shutdown()
            try:  # the engines' own report, if it comes soon (it names the engine that failed)
                future.result(timeout=self.timeout_s)
            except WeightSyncError as named:
                raise named from e
            except BaseException:
                pass
            if isinstance(e, concurrent.futures.TimeoutError):
                raise WeightSyncError(f"weight transfer: the engines did not take the weights within "
                                      f"rollout.sync_timeout_s={self.timeout_s}s") from e
            raise WeightSyncError(f"weight transfer failed on trainer rank 0: {e}".splitlines()[0]) from e
        finally:
            pool.shutdown(wait=False)  # a thread stuck in a dead peer's collective must not hold the caller

    def shutdown(self) -> None:
        close_group(self.group)
        self.group = self.store = None


def _buckets(pairs: Iterator[tuple[str, torch.Tensor]], counts: list[int]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`pairs` cut into buckets of `counts` tensors: the sender holds one bucket at a time."""
    for count in counts:
        yield [next(pairs) for _ in range(count)]


# -- what the trainer ranks call --------------------------------------------------------------------------------
class StreamSource(WeightSource):
    """vLLM's `WeightSource` over any object with `metadata()` ((name, dtype, shape) records) and re-iterable
    (name, tensor) pairs: rlkit.training.weights.TrainerWeights."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(m.name, m.dtype, tuple(m.shape)) for m in self.stream.metadata()]

    def __iter__(self):
        return iter(self.stream)


def open_trainer_engine(backend: str, stream, client, *, rank: int, world_size: int, timeout_s: float,
                        bucket_bytes: int, address: str | None = None) -> TrainerWeightTransferEngine:
    """The trainer side of `backend` for this rank (every rank calls it at once; rank 0 meets the engines).
    `world_size`: 1 + every engine worker; `address`: rank 0's node as the engines reach it (MASTER_ADDR, which
    rlkit.runtime.placement sets to rank 0's node; this machine's loopback when the run is one process)."""
    if backend not in TRANSPORTS:
        raise ValueError(f"rollout.weight_transfer: {backend!r} is not one of {TRANSPORTS}")
    address = address or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    source = StreamSource(stream)
    if backend == "gloo":
        info = GlooTrainerInitInfo(address, world_size, timeout_s, bucket_bytes, rank=rank)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
        from vllm.utils.network_utils import get_open_port

        info = NCCLTrainerInitInfo(address, get_open_port(), world_size, packed=True,
                                   packed_buffer_size_bytes=bucket_bytes, rank=rank)
    else:
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=bucket_bytes, rank=rank)
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)


def _register() -> None:
    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", GlooTrainerWeightTransferEngine)


_register()
