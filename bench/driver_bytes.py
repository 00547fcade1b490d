"""Bytes the driver serialises in one GRPO/PPO step on Ray, and the size of an engine's answer.

    python bench/driver_bytes.py [--prompts 16] [--group 8] [--prompt-tokens 64] [--response-tokens 256]
                                 [--minibatches 4] [--epochs 2]

1. The step's trainer traffic, measured: a real Ray cluster (2 FSDP2 trainer ranks and a reference actor, a
   randomly initialised tiny model: the bytes depend on the batch, not the model), driven through the same calls a
   GRPO step makes: the old log-probs (trainer group), the reference forward, then rlkit.algorithms.onpolicy's
   update over `--epochs` x `--minibatches` optimizer steps. Every object the driver serialises (ray.put and every
   actor-call argument Ray pickles) is counted by wrapping Ray's own SerializationContext.serialize in this process;
   the step batch's own size is printed beside it, so the ratio says how often the batch went through the driver.
2. An engine's answer for `--prompts` x `--group` completions of `--response-tokens` tokens, pickled as it crosses
   from an engine actor to the driver: per-token Python objects (tuples of ints and floats per completion, the old
   format) against rlkit.rollout.vllm_engine.Generations (flat arrays and offsets), when that exists.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Counter:
    """Wraps ray's SerializationContext.serialize in this process; `bytes` is what it produced since `reset`."""

    def __init__(self):
        from ray._private import serialization

        self.bytes, self.calls = 0, 0
        original = serialization.SerializationContext.serialize

        def serialize(ctx, value):
            out = original(ctx, value)
            self.bytes += out.total_bytes
            self.calls += 1
            return out

        serialization.SerializationContext.serialize = serialize

    def reset(self) -> None:
        self.bytes, self.calls = 0, 0


def step_batch(prompts: int, group: int, prompt_tokens: int, response_tokens: int):
    from rlkit.training.batches import pack_sequences

    g = torch.Generator().manual_seed(0)
    rows = prompts * group
    lengths = torch.randint(response_tokens // 4, response_tokens + 1, (rows,), generator=g).tolist()
    return pack_sequences([torch.randint(4, 90, (prompt_tokens,), generator=g).tolist() for _ in range(rows)],
                          [torch.randint(4, 90, (n,), generator=g).tolist() for n in lengths], pad_id=0)


def nbytes(batch) -> int:
    """Tensor bytes of a batch dataclass (nested batches included)."""
    total = 0
    for value in vars(batch).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dataclass_fields__"):
            total += nbytes(value)
    return total


def trainer_traffic(args) -> None:
    from rlkit.algorithms.onpolicy import policy_batch, update_policy
    from rlkit.recipe import AlgoConfig, ClusterConfig, ModelConfig, RecipeConfig, TrainerConfig
    from rlkit.runtime.cluster import Cluster
    from rlkit.training.modeling import init_model, save_checkpoint

    algo = AlgoConfig(ppo_minibatches=args.minibatches, ppo_epochs=args.epochs, group_size=args.group)
    cfg = RecipeConfig(trainer=TrainerConfig(dtype="float32", num_threads=1, logprob_impl="torch"), algo=algo,
                       cluster=ClusterConfig(backend="ray", trainer_ranks=2, cpus_per_trainer=0.5))
    cluster = Cluster(cfg)
    counter = Counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
            path = str(save_checkpoint(model, tok, Path(tmp) / "ckpt", ""))
            trainer = cluster.trainer_group(path, lr=1e-3, warmup_steps=1)
            reference = cluster.reference(path)
            ctx = SimpleNamespace(cfg=cfg, workers=SimpleNamespace(trainer=trainer), seed=lambda: 0)
            for step in range(2):  # the first warms up
                # a step's own objects, as a run makes them: its token batch, the mask of the samples that count
                tokens = step_batch(args.prompts, args.group, args.prompt_tokens, args.response_tokens)
                mask = tokens.response_mask * torch.ones(len(tokens), 1)
                exp = SimpleNamespace(rollout_logprobs=lambda width: torch.zeros(len(tokens), width))
                counter.reset()
                t0 = time.perf_counter()
                old = trainer.logprobs(tokens)
                ref = reference.logprobs(tokens)
                batch = policy_batch(cfg, exp, tokens, mask, old, ref, torch.zeros(len(tokens)))
                update_policy(ctx, batch, step)
                seconds = time.perf_counter() - t0
            print(f"step batch: {len(tokens)} rows x {tokens.input_ids.shape[1]} tokens; TokenBatch "
                  f"{nbytes(tokens) / 2**20:.2f} MiB, PolicyBatch {nbytes(batch) / 2**20:.2f} MiB")
            print(f"driver serialised per step ({args.epochs} epochs x {args.minibatches} minibatches, 2 ranks, "
                  f"reference): {counter.bytes / 2**20:.2f} MiB in {counter.calls} objects "
                  f"= {counter.bytes / nbytes(batch):.2f} x the PolicyBatch; step {seconds:.2f} s")
            cluster.release(trainer)
    finally:
        cluster.shutdown()


def engine_answer(args) -> None:
    g = torch.Generator().manual_seed(1)
    count = args.prompts * args.group
    lengths = torch.randint(args.response_tokens // 4, args.response_tokens + 1, (count,), generator=g).tolist()
    ids = [torch.randint(0, 150_000, (n,), generator=g).tolist() for n in lengths]  # a Qwen-sized vocabulary
    lps = [(-torch.rand(n, generator=g) * 5).float().tolist() for n in lengths]
    texts = ["x" * (4 * n) for n in lengths]  # about 4 characters a token
    old = [[(tuple(i), tuple(lp), t, True) for i, lp, t in zip(ids[p::args.prompts], lps[p::args.prompts],
                                                               texts[p::args.prompts])] for p in range(args.prompts)]
    tokens = sum(lengths)
    old_bytes = len(pickle.dumps(old, protocol=5))
    print(f"engine answer, {count} completions, {tokens} tokens: per-token objects {old_bytes / 2**10:.1f} KiB "
          f"({old_bytes / tokens:.1f} B/token, texts included)")
    try:
        import numpy as np

        from rlkit.rollout.vllm_engine import Generations
    except ImportError:
        return
    flat = Generations(np.concatenate([np.asarray(i, np.int32) for i in ids]),
                       np.concatenate([np.asarray(lp, np.float32) for lp in lps]),
                       np.cumsum([0, *lengths]).astype(np.int64), tuple(texts), np.ones(count, bool), 1)
    new_bytes = len(pickle.dumps(flat, protocol=5))
    t0 = time.perf_counter()
    for _ in range(20):
        pickle.loads(pickle.dumps(old, protocol=5))
    t_old = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        pickle.loads(pickle.dumps(flat, protocol=5))
    t_new = (time.perf_counter() - t0) / 20
    print(f"  Generations (flat arrays) {new_bytes / 2**10:.1f} KiB ({new_bytes / tokens:.1f} B/token): "
          f"{new_bytes / old_bytes:.2f} x the bytes; pickle+unpickle {t_old * 1e3:.2f} ms -> {t_new * 1e3:.2f} ms "
          f"({t_new / t_old:.2f} x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=256)
    parser.add_argument("--minibatches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    engine_answer(args)
    trainer_traffic(args)


if __name__ == "__main__":
    main()
