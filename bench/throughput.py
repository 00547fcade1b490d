"""GRPO throughput: rlkit against TRL's GRPOTrainer, same model, batch, group size and lengths, in one run.

    pip install trl            # only for this benchmark
    python bench/throughput.py [--steps 8] [--warmup 2]

Both sides train the same randomly initialised 512-wide, 8-layer Llama (character tokenizer) with GRPO on
8 prompts x 8 samples per step, up to 64 new tokens at temperature 1, a KL term to a reference (beta 0.02),
the math reward. Each runs in its own process; a step is timed end to end (generation, scoring, reference,
update, and for rlkit the weight sync to vLLM), the first `--warmup` steps are dropped, and the table shows
medians with rlkit / TRL ratios. Samples are counted as completions; tokens as generated completion tokens.
Below the table: rlkit's median seconds per phase, and the ratio it could reach if generation, scoring and
weight sync cost nothing (the reference forward and the policy update are the same arithmetic on both sides).
`--rollout-dtype bfloat16` runs rlkit's engine in bfloat16 (TRL still generates in float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS, GROUP, NEW_TOKENS = 8, 8, 64
PHASES = ("generate", "score", "reference", "train", "weight_sync")
MODEL = dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, max_seq_len=96)


def build_model(folder: Path) -> Path:
    from rlkit.config import ModelConfig
    from rlkit.modeling import init_model, save_checkpoint

    model, tokenizer = init_model(ModelConfig(**MODEL))
    return save_checkpoint(model, tokenizer, folder / "model", "")


def run_rlkit(model_path: Path, steps: int, warmup: int, work: Path, rollout_dtype: str) -> dict[str, float]:
    run_dir = work / "rlkit_run"
    overrides = [
        f"model.path={model_path}", f"model.max_seq_len={MODEL['max_seq_len']}",
        f"logging.output_dir={run_dir}", "logging.wandb_mode=disabled", "logging.log_every=1",
        "data.num_eval=8", f"algo.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "ref.kl_coef=0.02", f"rollout.dtype={rollout_dtype}",
        f"stages=[{{kind: grpo, steps: {steps}, batch_size: {PROMPTS}, lr: 1.0e-5}}]",
    ]
    proc = subprocess.run([sys.executable, "-m", "rlkit.run", "recipes/quickstart.yaml", *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rlkit run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "grpo/samples_per_s" in r][warmup:]
    return {
        "samples_per_s": statistics.median(r["grpo/samples_per_s"] for r in steps_rows),
        "tokens_per_s": statistics.median(r["grpo/tokens_per_s"] for r in steps_rows),
        "steps": len(steps_rows),
        "phases": {phase: statistics.median(r.get(f"grpo/time/{phase}", 0.0) for r in steps_rows) for phase in PHASES},
    }


TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, REPO)
from rewards.base import Sample
from rewards.math import MathReward
from rlkit.config import DataConfig
from rlkit.data import synthetic_splits

reward = MathReward()
def math_reward(prompts, completions, answer, **kwargs):
    return [reward.score(Sample(p, c, a)).score for p, c, a in zip(prompts, completions, answer)]

class StepTimer(TrainerCallback):
    def __init__(self): self.times, self.lengths = [], []
    def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): self.times.append(time.perf_counter() - self.t0)
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs: self.lengths.append(logs["completions/mean_length"])

train, _ = synthetic_splits(DataConfig(max_digits=2, num_train=2000, num_eval=16))
data = Dataset.from_list([{"prompt": "<s>" + p.prompt, "answer": p.answer} for p in train])
timer = StepTimer()
args = GRPOConfig(output_dir=OUT, per_device_train_batch_size=PROMPTS * GROUP, num_generations=GROUP,
                  max_completion_length=NEW_TOKENS, max_steps=STEPS, learning_rate=1e-5, beta=0.02,
                  temperature=1.0, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                  save_strategy="no", seed=0)
trainer = GRPOTrainer(model=MODEL_PATH, reward_funcs=math_reward, args=args, train_dataset=data, callbacks=[timer])
trainer.train()
print("RESULT", json.dumps({"times": timer.times, "lengths": timer.lengths}))
'''


def run_trl(model_path: Path, steps: int, warmup: int, work: Path) -> dict[str, float]:
    header = (f"REPO={str(REPO)!r}; MODEL_PATH={str(model_path)!r}; OUT={str(work / 'trl_out')!r}; "
              f"STEPS={steps}; PROMPTS={PROMPTS}; GROUP={GROUP}; NEW_TOKENS={NEW_TOKENS}\n")
    proc = subprocess.run([sys.executable, "-c", header + TRL_SCRIPT], cwd=work, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    times, lengths = result["times"][warmup:], result["lengths"][warmup:] or result["lengths"]
    step = statistics.median(times)
    samples = PROMPTS * GROUP
    return {"samples_per_s": samples / step, "tokens_per_s": samples * statistics.median(lengths) / step,
            "steps": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rollout-dtype", default="auto",
                        help="rlkit's engine dtype (auto: float32 on CPU, the precision TRL generates in here)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is the baseline: pip install trl")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_path = build_model(work)
        t0 = time.perf_counter()
        ours = run_rlkit(model_path, args.steps, args.warmup, work, args.rollout_dtype)
        t1 = time.perf_counter()
        theirs = run_trl(model_path, args.steps, args.warmup, work)
        t2 = time.perf_counter()
    print(f"GRPO, {PROMPTS} prompts x {GROUP} samples, <= {NEW_TOKENS} new tokens, model {MODEL}, "
          f"rlkit rollout.dtype={args.rollout_dtype}")
    print(f"median of {ours['steps']} (rlkit) and {theirs['steps']} (TRL) steps after {args.warmup} warm-up steps")
    print(f"{'':10s} {'samples/s':>10s} {'tokens/s':>10s} {'wall s':>8s}")
    print(f"{'TRL':10s} {theirs['samples_per_s']:10.2f} {theirs['tokens_per_s']:10.1f} {t2 - t1:8.0f}")
    print(f"{'rlkit':10s} {ours['samples_per_s']:10.2f} {ours['tokens_per_s']:10.1f} {t1 - t0:8.0f}")
    print(f"{'ratio':10s} {ours['samples_per_s'] / theirs['samples_per_s']:9.2f}x "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x")
    # Where rlkit's step goes, and the ratio it would reach if generation cost nothing: the reference forward
    # and the policy's forward/backward are the same arithmetic in any GRPO implementation of this setup.
    phases, trl_step = ours["phases"], PROMPTS * GROUP / theirs["samples_per_s"]
    print("\nrlkit step, median seconds per phase")
    for phase, seconds in phases.items():
        print(f"  {phase:12s} {seconds:6.2f}")
    floor = phases["reference"] + phases["train"]
    print(f"TRL step {trl_step:.2f} s; reference + train alone {floor:.2f} s: with free generation, "
          f"scoring and sync the ratio would be at most {trl_step / floor:.2f}x")


if __name__ == "__main__":
    main()
