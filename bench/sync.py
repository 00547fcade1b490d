"""Weight sync, trainer to engines: `file` (the state dict through the driver, safetensors per engine) against `gloo`
(streamed from trainer rank 0 straight to the engine workers through vLLM's weight-transfer API), measured in one run.

    python bench/sync.py [--sizes 0.1B,0.5B,1.5B] [--engines 1,2] [--repeats 3] [--transports file,gloo]
                         [--precision auto|float32|bfloat16]

Randomly initialised Qwen2-shaped models (tied embeddings, Qwen2.5's 151,936-token vocabulary), trained and served
in `--precision` (`auto`, the default: bfloat16 where this CPU computes it natively, a trainer in bf16 mixed
precision over float32 master weights; else float32), on Ray as a run places them: one trainer rank and one or two
engines, each an actor. Per sync (median of --repeats; the first sync, which opens the transfer
group, is not timed; the bytes sent do not depend on the weights' values, so the trainer does not step between):
- s/sync: seconds, the driver's call to the end of the last engine's load;
- MB moved: the weight bytes handed to a transport: `file` sends the float32 state dict to the driver and from there
  to every engine; `gloo` sends the engines' dtype once from rank 0 (gloo relays it to every engine);
- driver / rank-0 peak MB: the growth of each process's resident memory during the sync over its value before
  (sampled every 5 ms).
Ratios are file / gloo (above 1: gloo is faster, moves less, holds less). `--transports gloo` measures gloo alone,
for a model whose `file` sync does not fit the machine's memory (its columns then read n/a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# this checkout first; rlkit.kernels, .rewards, .rollout and .envs still come from the install (pip install -e .)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen2-shaped: (hidden, layers, intermediate, heads, kv heads); Qwen2.5-0.5B and -1.5B's own shapes, and a smaller one
SIZES = {"0.1B": (512, 12, 2816, 8, 2), "0.5B": (896, 24, 4864, 14, 2), "1.5B": (1536, 28, 8960, 12, 2)}
VOCAB, MAX_LEN = 151936, 64


def build_model(size: str, folder: Path) -> int:
    """A random Qwen2 model of `size` saved in bf16 with the test suite's small tokenizer; returns its parameters."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.chat_model import build_tokenizer

    hidden, layers, inter, heads, kv = SIZES[size]
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                         max_position_embeddings=MAX_LEN * 4, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


class PeakRSS:
    """The largest resident-memory growth of some processes while it runs (a 5 ms sampling thread)."""

    def __init__(self, pids: list[int]):
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.base = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def growth_mb(self) -> list[float]:
        return [(peak - base) / 2**20 for peak, base in zip(self.peak, self.base)]


def measure(cluster, trainer, pool, transport: str, repeats: int, rank0_pid: int) -> tuple[float, float, float, float]:
    """(median s/sync, MB moved, driver peak MB, rank-0 peak MB) of `transport`."""
    from rlkit.runtime.cluster import RolloutPool

    engines = len(pool.engines)
    pool = RolloutPool(pool.engines, pool._resolve, transport=transport, timeout_s=pool.timeout_s,
                       bucket_mb=pool.bucket_mb)
    times, peaks = [], []
    for _ in range(repeats + 1):  # the first opens the transfer group: not timed
        with PeakRSS([os.getpid(), rank0_pid]) as rss:
            t0 = time.perf_counter()
            if transport == "file":
                state = trainer.state_dict()  # the float32 master weights: the engines cast them on arrival
                stats = pool.sync_weights(state)
                distinct = {t.data_ptr(): t for t in state.values()}.values()  # a tied embedding is pickled once
                sent = sum(t.numel() * t.element_size() for t in distinct) / 2**20
                moved = sent * (1 + engines)  # rank 0 -> driver, driver -> each engine
                del state
            else:
                stats = pool.pull_weights(trainer)
                moved = stats.megabytes  # rank 0 -> the group, once
            times.append(time.perf_counter() - t0)
        peaks.append(rss.growth_mb())
    return statistics.median(times[1:]), moved, max(p[0] for p in peaks[1:]), max(p[1] for p in peaks[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1B,0.5B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="1,2", help="engine counts to measure, e.g. 1 where memory is short")
    parser.add_argument("--transports", default="file,gloo", help="`gloo` alone where `file` runs out of memory")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="trainer and engine dtype (auto: bf16 where this CPU computes it natively, else float32)")
    args = parser.parse_args()
    from rlkit.kernels.precision import describe_machine
    from rlkit.training.precision import resolve

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    dtype = resolve(args.precision, "cpu", "--precision")[0]  # an emulated bf16 warns with its slowdown
    print(f"load average before: {os.getloadavg()}", flush=True)

    import ray

    from rlkit.recipe import ClusterConfig, ModelConfig, RecipeConfig, RolloutConfig, TrainerConfig
    from rlkit.runtime.cluster import Cluster, RolloutPool

    cfg = RecipeConfig(
        rollout=RolloutConfig(dtype=dtype, max_new_tokens=4, sync_timeout_s=600, weight_transfer="gloo"),
        trainer=TrainerConfig(dtype=dtype, num_threads=1),
        cluster=ClusterConfig(backend="ray", rollout_engines=max(int(n) for n in args.engines.split(",")),
                              cpus_per_engine=0.5, cpus_per_trainer=0.5),
        model=ModelConfig(max_seq_len=MAX_LEN))
    cluster = Cluster(cfg)
    rows = []
    try:
        for size in args.sizes.split(","):
            with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                params = build_model(size, Path(tmp) / "model")
                path = str(Path(tmp) / "model")
                trainer = cluster.trainer_group(path, lr=1e-4, warmup_steps=0)
                rank0_pid = ray.get(trainer.workers[0].actor.__ray_call__.remote(lambda self: os.getpid()))
                both = cluster.rollout_pool(path)
                for engines in [int(n) for n in args.engines.split(",")]:
                    pool = RolloutPool(both.engines[:engines], both._resolve, transport="gloo",
                                       timeout_s=both.timeout_s, bucket_mb=both.bucket_mb)
                    result = {t: measure(cluster, trainer, pool, t, args.repeats, rank0_pid)
                              for t in args.transports.split(",")}
                    rows.append((size, params, engines, result))
                    print(size, engines, result, flush=True)
                cluster.release(trainer, both)
    finally:
        cluster.shutdown()

    trained = "bf16 mixed precision (float32 master weights)" if dtype == "bfloat16" else dtype
    print(f"\nQwen2-shaped, tied, {dtype} engines, trainer {trained}; "
          f"median of {args.repeats}; load average after: {os.getloadavg()}")
    head = ["model", "engines", "s/sync file", "gloo", "ratio", "MB moved file", "gloo", "ratio",
            "driver peak MB file", "gloo", "rank-0 peak MB file", "gloo"]
    print(" | ".join(head))
    for size, params, engines, r in rows:
        f, g = r.get("file"), r.get("gloo")
        cells = [f"{size} ({params / 1e9:.2f}B)", str(engines)]
        for k, form in ((0, "{:.2f}"), (1, "{:.0f}")):  # seconds, then MB moved: file, gloo, ratio
            cells += [form.format(f[k]) if f else "n/a", form.format(g[k]) if g else "n/a",
                      f"{f[k] / g[k]:.1f}x" if f and g else "n/a"]
        for k in (2, 3):  # driver's, then rank 0's peak growth: file, gloo
            cells += [f"{f[k]:.0f}" if f else "n/a", f"{g[k]:.0f}" if g else "n/a"]
        print(" | ".join(cells))
    size = 2 if dtype == "bfloat16" else 4
    print(f"MB moved for gloo is {size} bytes x parameters, once, whatever the engines (gloo relays it to each receiver)")


if __name__ == "__main__":
    main()
