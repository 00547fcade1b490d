"""`rollout.engine_kwargs`, checked at load against vLLM's own engine arguments, without importing vLLM.

vLLM's engine arguments are the fields of its `vllm.engine.arg_utils.EngineArgs` dataclass. Importing it imports
torch and vLLM (seconds, and rlkit.recipe stays torch-free: tests/test_imports.py), so the field names are read from
that module's source (`ast`, about 50 ms, once per process) where the installed vLLM keeps it. The engine checks the
same keys again against `dataclasses.fields(EngineArgs)` when it starts (rlkit.rollout.vllm_engine.engine_kwargs),
and tests/rollout/test_vllm_engine.py holds the two lists equal, so a vLLM that moves its arguments fails a test
rather than a run. Without vLLM installed (a recipe checked on a machine that runs no engine) the names are unknown
and only the keys rlkit owns are refused here.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
from pathlib import Path

from rlkit.recipe.errors import RecipeError

# The engine arguments rlkit sets itself (rlkit.rollout.vllm_engine.engine_kwargs), each with where a recipe sets it.
OWNED = {
    "model": "model.path (or the stage's checkpoint)",
    "dtype": "rollout.dtype",
    "seed": "trainer.seed (each engine takes seed + its index)",
    "max_model_len": "model.max_seq_len",
    "tensor_parallel_size": "rollout.tensor_parallel_size",
    "distributed_executor_backend": "rollout.tensor_parallel_size (rlkit runs an engine's workers as processes)",
    "max_num_seqs": "rollout.max_num_seqs",
    "weight_transfer_config": "rollout.weight_transfer",
    "worker_extension_cls": "rollout.weight_transfer (rlkit's gloo transport is a worker extension)",
    "gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "kv_cache_memory_bytes": "rollout.gpu_kv_cache_gib",
    "enforce_eager": "rollout.enforce_eager",
    "enable_lora": "trainer.lora_sync: adapter",
    "max_loras": "trainer.lora_sync: adapter (one adapter at a time)",
    "max_lora_rank": "trainer.lora_rank",
    "logprobs_mode": "nothing: the engine's log-probs are after temperature, as the trainer's",
    "use_tqdm_on_load": "nothing: rlkit silences vLLM's per-sync progress bar",
    "enable_chunked_prefill": "nothing on CPU, where a prompt is prefilled whole (rlkit.rollout.vllm_engine)",
    "max_num_batched_tokens": "nothing on CPU, where a prompt is prefilled whole (rlkit.rollout.vllm_engine)",
}


@functools.lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str] | None:
    """The field names of the installed vLLM's EngineArgs, read from its source; None without vLLM."""
    spec = importlib.util.find_spec("vllm")  # a top-level package: found, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "EngineArgs"]
    return frozenset(n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                     and "ClassVar" not in ast.unparse(n.annotation))


def engine_kwargs_problem(key: str, known: frozenset[str] | None) -> str | None:
    """What is wrong with one key of rollout.engine_kwargs (None: nothing), in one line naming it and the fix.

    >>> print(engine_kwargs_problem("dtype", frozenset({"dtype"})))
    rollout.engine_kwargs.dtype: rlkit sets this engine argument itself; set rollout.dtype instead and remove it
    >>> print(engine_kwargs_problem("enable_prefix_cachng", frozenset({"enable_prefix_caching", "seed"})))
    rollout.engine_kwargs.enable_prefix_cachng: not an engine argument of the installed vLLM (EngineArgs); did you mean 'enable_prefix_caching'? Fix or remove it
    >>> engine_kwargs_problem("enable_prefix_caching", frozenset({"enable_prefix_caching"})) is None
    True
    """
    where = f"rollout.engine_kwargs.{key}"
    if key in OWNED:
        return f"{where}: rlkit sets this engine argument itself; set {OWNED[key]} instead and remove it"
    if known is not None and key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (f"{where}: not an engine argument of the installed vLLM (EngineArgs); {hint}Fix or remove it")
    return None


def check_engine_kwargs(engine_kwargs: dict, known: frozenset[str] | None = None) -> None:
    """Each key of rollout.engine_kwargs is one of vLLM's engine arguments and none rlkit sets itself."""
    known = engine_arg_names() if known is None and engine_kwargs else known
    for key in sorted(engine_kwargs):
        problem = engine_kwargs_problem(str(key), known)
        if problem:
            raise RecipeError(problem)
