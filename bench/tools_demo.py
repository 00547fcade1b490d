"""Tool use on the embedded default, measured: the same small model, the same SFT steps on two-digit by two-digit
multiplication (mul_hard), with and without the calculator; held-out accuracy greedy through vLLM, judged by the
math reward on the last answer.

    python bench/tools_demo.py [--steps 800] [--out runs/tools_demo]

- tools: SFT on synthetic traces that call the calculator (recipes/quickstart_tools.yaml, data.tool_traces), then
  episodes with env.name=tools (rlkit.algorithms.episodes.run_episodes: up to rollout.max_turns turns);
- bare: SFT on the answers alone (data.tool_traces=false), one turn, the quickstart's 12 new tokens.
Both train through `python -m rlkit.run` (its sft stage, as shipped); the GRPO stage of the recipe samples whole
episodes once the stages call run_episodes, so it is left out here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# this checkout first; rlkit.kernels, .rewards, .rollout and .envs still come from the install (pip install -e .)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = "recipes/quickstart_tools.yaml"
THREADS = 1  # torch intra-op threads of the trainer: spinning OpenMP threads cost most on a loaded machine
BARE = ["data.tool_traces=false", "env.name=", "rollout.max_turns=1", "rollout.max_episode_tokens=0",
        "rollout.max_new_tokens=12"]


def train(out: Path, steps: int, batch: int, lr: float, overrides: list[str]) -> float:
    """Run the recipe's SFT stage alone; returns its wall-clock seconds (the runner's evaluations included)."""
    stage = f"stages=[{{kind: sft, steps: {steps}, batch_size: {batch}, lr: {lr}, save_every: {steps // 3}}}]"
    argv = [sys.executable, "-m", "rlkit.run", RECIPE, stage, f"logging.output_dir={out}", "logging.overwrite=true",
            "logging.wandb_mode=disabled", f"trainer.num_threads={THREADS}", *overrides]
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


def held_out_accuracy(checkpoint: Path, overrides: list[str]) -> dict:
    """Greedy episodes on the recipe's held-out problems from `checkpoint`, scored by the math reward."""
    from rlkit.envs.base import Environment
    from rlkit.rewards.base import Sample, Verdict
    from rlkit.rewards.math import MathReward
    from rlkit.runtime.cluster import engine_config
    from rlkit.recipe import load_recipe
    from rlkit.algorithms.episodes import episode_metrics, make_env_factory, run_episodes
    from rlkit.training.modeling import load_tokenizer
    from rlkit.data.prepare import prepare_run_data
    from rlkit.rollout.vllm_engine import VllmRollout

    cfg = load_recipe(RECIPE, overrides)
    data = prepare_run_data(cfg, load_tokenizer(checkpoint))
    factory = make_env_factory(cfg.env) or Environment
    engine = VllmRollout(engine_config(cfg.rollout), str(checkpoint), max_model_len=cfg.model.max_seq_len)
    try:
        start = time.perf_counter()
        groups = run_episodes(engine, data.renderer, factory, data.held_out, 1, 0.0, 0, cfg.rollout.max_turns,
                              cfg.rollout.episode_tokens, max_new_tokens=cfg.rollout.max_new_tokens)
        seconds = time.perf_counter() - start
    finally:
        engine.close()
    reward = MathReward()
    correct = [reward.score(Sample(p.prompt, g[0].text, p.answer)).verdict == Verdict.CORRECT
               for p, g in zip(data.held_out, groups)]
    return {"accuracy": sum(correct) / len(correct), "problems": len(correct), "eval_seconds": seconds,
            **episode_metrics(groups), "example": groups[0][0].transcript}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default="runs/tools_demo")
    parser.add_argument("--skip-train", action="store_true", help="evaluate the checkpoints already in --out")
    args = parser.parse_args()
    from rlkit.kernels.precision import describe_machine

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    results = {}
    for name, overrides in (("tools", []), ("bare", BARE)):
        out = Path(args.out) / name
        train_s = None if args.skip_train else train(out, args.steps, args.batch_size, args.lr, overrides)
        results[name] = {"sft_seconds": train_s, **held_out_accuracy(out / "checkpoints" / "01_sft", overrides)}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print("| | held-out accuracy | SFT seconds | turns/episode | tool calls/episode | tool error rate |")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['sft_seconds'] or 0:.0f} | {r['episode/turns']:.2f} | "
              f"{r['episode/tool_calls']:.2f} | {r['episode/tool_error_rate']:.3f} |")


if __name__ == "__main__":
    main()
