"""The rollout engine's own costs, rlkit's settings against vLLM's defaults, measured in one run.

    python bench/engine.py [--repeats 5] [--precision auto|float32|bfloat16]

On the throughput benchmark's model (512-wide, 8-layer Llama on CPU; engine and trainer in `--precision`, by default
`auto`: bfloat16 where this CPU computes it natively, else float32, rlkit.kernels.precision):
- decode: 8 prompts x 8 samples x 64 new tokens (EOS ignored), median seconds. Baseline: vLLM's automatic CPU
  binding (VLLM_CPU_OMP_THREADS_BIND=auto, which keeps a core for the scheduler); rlkit: every allowed core.
- shutdown: seconds for the engine to stop after use. Baseline: vLLM's default grace; rlkit: `VllmRollout.close`.
- weight sync: median seconds and MB per sync of a rank-8 LoRA trainer's weights. Baseline: the merged model
  (`trainer.lora_sync: merged`); rlkit's option: the adapter alone (`trainer.lora_sync: adapter`).
Ratios are baseline / rlkit (above 1: rlkit is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this checkout first; rlkit.kernels, .rewards, .rollout and .envs still come from the install (pip install -e .)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, max_seq_len=96)
PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64


def decode_seconds(engine, repeats: int) -> float:
    """Median seconds to decode PROMPTS x GROUP samples of exactly NEW_TOKENS tokens (EOS ignored, so every
    engine does the same work) through the engine's vLLM instance."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[1] + list(range(10, 30)))] * PROMPTS
    params = SamplingParams(n=GROUP, temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0, seed=0)
    engine.llm.generate(prompts, params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_engine(model_path: Path, bind: str | None, dtype: str, lora_rank: int = 0):
    from rlkit.rollout import EngineConfig
    from rlkit.rollout.vllm_engine import VllmRollout

    if bind is None:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # rlkit's default
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind  # read by the engine processes vLLM spawns
    cfg = EngineConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, dtype=dtype)
    return VllmRollout(cfg, str(model_path), MODEL["max_seq_len"], lora_rank=lora_rank)


def sync_seconds(engine, trainer, repeats: int, adapter: bool) -> tuple[float, float]:
    from rlkit.training.lora import adapter_config

    engine.sync_weights(trainer.full_state_dict(merged=False))  # the base, as a stage's first sync
    times, megabytes = [], 0.0
    for _ in range(repeats):
        if adapter:
            stats = engine.sync_adapter(trainer.adapter_state_dict(), adapter_config(trainer.cfg))
        else:
            stats = engine.sync_weights(trainer.full_state_dict())
        times.append(stats.seconds)
        megabytes = stats.megabytes
    return statistics.median(times), megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="engine and trainer dtype (auto: bf16 where this CPU computes it natively, else float32)")
    args = parser.parse_args()
    from rlkit.kernels.precision import describe_machine
    from rlkit.training.precision import resolve

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    dtype = resolve(args.precision, "cpu", "--precision")[0]  # an emulated bf16 warns with its slowdown

    from rlkit.recipe import ModelConfig, TrainerConfig
    from rlkit.training.modeling import init_model, save_checkpoint
    from rlkit.training.trainer import ShardedTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = init_model(ModelConfig(**MODEL))
        path = save_checkpoint(model, tok, Path(tmp) / "model", "")
        rows = []

        for name, bind in (("vLLM auto binding", "auto"), ("rlkit", None)):
            engine = make_engine(path, bind, dtype)
            decode = decode_seconds(engine, args.repeats)
            t0 = time.perf_counter()
            if bind == "auto":  # vLLM's own shutdown, default grace
                engine._pool.shutdown(wait=False)
                engine.llm.llm_engine.engine_core.shutdown()
            else:
                engine.close()
            rows.append((name, decode, time.perf_counter() - t0))

        trainer = ShardedTrainer(TrainerConfig(lora_rank=8, lora_sync="adapter", dtype=dtype), str(path), 1e-4, 1)
        engine = make_engine(path, None, dtype, lora_rank=8)
        merged = sync_seconds(engine, trainer, args.repeats, adapter=False)
        adapter = sync_seconds(engine, trainer, args.repeats, adapter=True)
        engine.close()

    (base_name, base_decode, base_stop), (_, ours_decode, ours_stop) = rows
    print(f"model {MODEL}, {dtype}; decode {PROMPTS} x {GROUP} x {NEW_TOKENS} tokens; median of {args.repeats}")
    print(f"{'':28s} {'baseline':>10s} {'rlkit':>10s} {'ratio':>8s}")
    print(f"{'decode s':28s} {base_decode:10.2f} {ours_decode:10.2f} {base_decode / ours_decode:7.2f}x")
    print(f"{'shutdown s':28s} {base_stop:10.2f} {ours_stop:10.2f} {base_stop / ours_stop:7.2f}x")
    print(f"{'LoRA sync s (merged/adapter)':28s} {merged[0]:10.3f} {adapter[0]:10.3f} {merged[0] / adapter[0]:7.2f}x")
    print(f"{'LoRA sync MB (merged/adapter)':28s} {merged[1]:10.2f} {adapter[1]:10.2f} {merged[1] / adapter[1]:7.2f}x")
    print(f"baseline: {base_name} and vLLM's default shutdown grace; LoRA rows: merged weights vs adapter only")


if __name__ == "__main__":
    main()
