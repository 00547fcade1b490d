"""Rollout engines: sampling completions with log-probs, and taking weights from the trainer.

`EngineConfig` is what an engine needs, and lives here (torch-free) so that a reward describing its own engine
(rlkit.rewards.judge) imports no engine code. rlkit turns its recipe's `rollout` section into one
(rlkit.runtime.cluster.engine_config); this package imports only rlkit.kernels (its precision probe) of rlkit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EngineConfig:
    """The settings of one `rlkit.rollout.vllm_engine.VllmRollout`. The defaults equal the recipe's `rollout` section
    (tests/runtime/test_cluster.py checks that they agree); see rlkit.recipe.RolloutConfig for each field's story."""

    temperature: float = 1.0  # default sampling temperature of `generate`
    top_p: float = 1.0  # nucleus sampling when temperature > 0
    max_new_tokens: int = 12  # default completion length of `generate`
    # served weights: "auto" (bfloat16 where the device computes it natively, else float32: rlkit.kernels.precision),
    # "float32", "bfloat16", "float16"
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU (weights and KV cache)
    gpu_kv_cache_gib: float = 0.0  # on GPU, > 0: the KV cache's size per GPU (vLLM's kv_cache_memory_bytes)
    enforce_eager: bool = True  # no CUDA graphs: a faster start, for short runs
    tensor_parallel_size: int = 1  # GPUs the engine spans, one vLLM worker process each
    max_num_seqs: int = 256  # sequences decoded at once
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # further vllm.LLM arguments, passed as they are
    sync_dir: str = "/dev/shm/rlkit_sync"  # where trainer weights are written for the engine to reload
    sync_timeout_s: float = 60.0  # a weight sync that takes longer raises WeightSyncError
    # "gloo" | "nccl" | "ipc": the engine takes weights through vLLM's weight-transfer API
    # (rlkit.rollout.weight_transfer), and still through files; "file": through files only; "auto": nccl with CUDA, else gloo
    weight_transfer: str = "auto"
    sync_bucket_mb: float = 256.0  # the recipe's; the trainer side cuts the stream in buffers of this size
