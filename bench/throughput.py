"""GRPO throughput: rlkit against TRL's GRPOTrainer, same model, batch, group size and lengths, in one run.

    pip install trl            # only for this benchmark
    python bench/throughput.py [--steps 8] [--warmup 2] [--prompts 8] [--group 8]
    python bench/throughput.py --model runs/smollm2-135m-instruct   # a real chat model
    python bench/throughput.py --lengths gsm8k                      # GSM8K prompts
    python bench/throughput.py --precision fp32|bf16                # instead of auto (the default)

`--precision auto` (default) is bf16 mixed precision on both sides where this machine computes bf16 natively (a
CPU with AVX512-BF16 or AMX, a GPU from sm_80; rlkit.kernels.precision) and float32 elsewhere: on an AVX2 CPU a bf16
matmul runs about 500x slower than float32, and a bf16 run would not finish. The header says which it chose and
why, with the CPU's capability.

Without `--model`, both sides train the same randomly initialised 512-wide, 8-layer Llama (character tokenizer)
in float32 on plain-text prompts. With `--model DIR` (a local Hugging Face folder; nothing is fetched) both load
DIR and run two-digit addition (`add_hard`) with prompts rendered by the model's chat template (the same token
ids on both sides), completions as long as the model makes them up to the limit, ending at its own end-of-turn
token. In bf16 (`--precision`) both sides run:
- rlkit: `trainer.dtype=bfloat16` (bf16 autocast over float32 master weights and optimizer), the vLLM engine and
  the reference model hold bf16 weights (`rollout.dtype`, `ref.dtype`);
- TRL: `bf16=True` with the model loaded in float32, TRL's default and its only bf16 that trains properly here
  (accelerate's bf16 autocast for generation, reference and update, over float32 weights and optimizer); a model
  loaded in bf16 would take bf16 optimizer steps, a different training run. Its gradient checkpointing (on by
  default in GRPOConfig) is turned off to match rlkit's default.
Both sides do full fine-tuning (no LoRA) with GRPO on `--prompts` x `--group` samples per step, up to 64 new
tokens at temperature 1, a KL term to a reference (beta 0.02), token-mean loss, group-std reward scaling, learning
rate 1e-5 and the math reward; each runs in its own process. A step is timed end to end (generation, scoring,
reference, update, and for rlkit the weight sync to vLLM), the first `--warmup` steps are dropped, and the table
shows medians with rlkit / TRL ratios. Samples are counted as completions; tokens as generated completion tokens;
`len` is the mean completion length in tokens (both sides sample their own lengths, so compare it before the
tokens/s ratio). Below the table: rlkit's median seconds per phase, and the ratio it could reach if generation,
scoring and weight sync cost nothing (the reference forward and the policy update are the same arithmetic on both
sides). `--rollout-dtype bfloat16` runs rlkit's engine in bfloat16 without `--model` (TRL still generates in
float32 there).

bf16 (`--precision bf16`, or auto on native bf16) is mixed precision on both sides (TRL's own default,
`bf16=True` over float32 weights; rlkit `trainer.dtype`, `ref.dtype` and `rollout.dtype` bfloat16), the same GRPO
settings otherwise; fp32 is float32 on both sides (rlkit's dtypes set to float32, TRL `bf16=False`). `--lengths gsm8k` swaps the arithmetic prompts for GSM8K questions
(data/gsm8k_test.jsonl) under a byte-level BPE (vocabulary 2048) trained on that file at run time, the model
built with that tokenizer (same shape), up to `--new-tokens` (default 256) completion tokens, and rlkit bins each
update's rows by length and packs them (`trainer.micro_batch_tokens` GSM8K_BUDGET, `trainer.packing`: each
micro-batch's rows as one sequence, attention row by row, rlkit.training.attention; bench/lengths.py). TRL's GRPOTrainer has
no padding-free option (GRPOConfig has no `padding_free` in TRL 1.16, only its SFT and DPO configs do), so it runs
padded. The random model seldom samples its end token,
so completions run to the limit on both sides: the length mix is in the prompts (`len` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("generate", "score", "reference", "train", "weight_sync")
MODEL = dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, max_seq_len=96)
PROMPT_TEMPLATE = "{prompt}?\nPut the final answer after ####."  # as recipes/smollm2_arith.yaml
CHAT_MAX_SEQ_LEN = 160  # a rendered add_hard prompt is ~45 SmolLM2 tokens, + 64 new
GSM8K_MAX_PROMPT = 256  # BPE tokens; longer questions are left out on both sides (none in the test split)
GSM8K_BUDGET = 4096  # rlkit's trainer.micro_batch_tokens at GSM8K lengths


@dataclass(frozen=True)
class Setup:
    """The GRPO run both sides make."""

    model_path: str
    chat: bool = False  # a real chat model (--model): chat-template prompts, add_hard
    bf16: bool = False  # bf16 mixed precision on both sides (--precision), else float32
    gsm8k: str = ""  # a prompt/answer .jsonl of GSM8K questions (--lengths gsm8k) instead of arithmetic
    prompts: int = 8  # prompts per step
    group: int = 8  # samples per prompt
    new_tokens: int = 64  # most completion tokens
    lr: float = 1e-5
    beta: float = 0.02  # KL coefficient (rlkit ref.kl_coef)
    temperature: float = 1.0

    @property
    def data(self) -> dict:
        """DataConfig fields of the prompts (TRL draws its own from the same generator)."""
        if self.gsm8k:
            return dict(source=self.gsm8k, chat_template="none")
        if self.chat:
            return dict(tasks=["add_hard"], max_digits=2, prompt_template=PROMPT_TEMPLATE)
        return dict(max_digits=2)


def rlkit_overrides(s: Setup, run_dir: Path, rollout_dtype: str, steps: int) -> list[str]:
    """rlkit.run overrides of recipes/quickstart.yaml for `s`.

    >>> o = rlkit_overrides(Setup("m", chat=True, bf16=True), Path("r"), "bfloat16", 3)
    >>> [x for x in o if x.startswith(("trainer.", "ref.dtype"))]
    ['trainer.dtype=bfloat16', 'ref.dtype=bfloat16']
    >>> [x for x in rlkit_overrides(Setup("m"), Path("r"), "float32", 3) if x.startswith(("trainer.", "ref.dtype"))]
    ['trainer.dtype=float32', 'ref.dtype=float32']
    >>> o[-1]
    'data.prompt_template="{prompt}?\\\\nPut the final answer after ####."'
    """
    seq_len = GSM8K_MAX_PROMPT + s.new_tokens if s.gsm8k else CHAT_MAX_SEQ_LEN if s.chat else MODEL["max_seq_len"]
    out = [
        f"model.path={s.model_path}", f"model.max_seq_len={seq_len}",
        f"logging.output_dir={run_dir}", "logging.wandb_mode=disabled", "logging.log_every=1",
        "data.num_eval=8", f"algo.group_size={s.group}", f"rollout.max_new_tokens={s.new_tokens}",
        f"ref.kl_coef={s.beta}", f"rollout.dtype={rollout_dtype}", f"rollout.temperature={s.temperature}",
        f"stages=[{{kind: grpo, steps: {steps}, batch_size: {s.prompts}, lr: {s.lr}}}]",
    ]
    dtype = "bfloat16" if s.bf16 else "float32"  # explicit: rlkit's own `auto` is not the benchmark's choice
    out += [f"trainer.dtype={dtype}", f"ref.dtype={dtype}"]
    if s.gsm8k:  # rows binned by length and packed: no compute on padding (bench/lengths.py)
        out += [f"data.source={s.gsm8k}", "data.num_train=1200", "data.chat_template=none",
                f"trainer.micro_batch_tokens={GSM8K_BUDGET}", "trainer.packing=true"]
    elif s.chat:  # a JSON string is a YAML double-quoted one: the template's newline survives the override parser
        out += [f"data.tasks=[{','.join(s.data['tasks'])}]", f"data.prompt_template={json.dumps(PROMPT_TEMPLATE)}"]
    return out


def trl_args(s: Setup, out: Path, steps: int) -> dict:
    """GRPOConfig keyword arguments for `s`; TRL's defaults already match rlkit's loss (token-mean, "dapo"),
    reward scaling (group std), clip range (0.2) and top-p/top-k (off).

    >>> a = trl_args(Setup("m", chat=True, bf16=True), Path("o"), 3)
    >>> a["bf16"], a["model_init_kwargs"], a["gradient_checkpointing"], a["per_device_train_batch_size"]
    (True, {'dtype': 'float32'}, False, 64)
    >>> trl_args(Setup("m"), Path("o"), 3)["bf16"], trl_args(Setup("m"), Path("o"), 3)["gradient_checkpointing"]
    (False, False)
    """
    args = dict(output_dir=str(out), per_device_train_batch_size=s.prompts * s.group, num_generations=s.group,
                max_completion_length=s.new_tokens, max_steps=steps, learning_rate=s.lr, beta=s.beta,
                temperature=s.temperature, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                save_strategy="no", seed=0,
                gradient_checkpointing=False)  # GRPOConfig's default is on, rlkit's off: same arithmetic on both
    if s.bf16:  # bf16 mixed precision over float32 weights, like rlkit's trainer.dtype=bfloat16
        args.update(bf16=True, model_init_kwargs={"dtype": "float32"})
    return args


def build_model(folder: Path) -> Path:
    from rlkit.recipe import ModelConfig
    from rlkit.training.modeling import init_model, save_checkpoint

    model, tokenizer = init_model(ModelConfig(**MODEL))
    return save_checkpoint(model, tokenizer, folder / "model", "")


def build_gsm8k(folder: Path, max_seq_len: int) -> tuple[Path, Path]:
    """The embedded model's shape over a byte-level BPE trained on GSM8K here, and a prompt/answer .jsonl of the
    GSM8K questions (gold: the number after ####) that fit GSM8K_MAX_PROMPT tokens."""
    from transformers import PreTrainedTokenizerFast

    from bench.lengths import GSM8K, train_bpe
    from rlkit.recipe import ModelConfig
    from rlkit.training.modeling import build_model as build_llama, save_checkpoint

    core = train_bpe()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        clean_up_tokenization_spaces=False)
    model = build_llama(ModelConfig(**MODEL | {"max_seq_len": max_seq_len}), len(tokenizer), tokenizer)
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()]
    lines = [json.dumps({"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip()}) for r in rows
             if len(core.encode(r["question"]).ids) < GSM8K_MAX_PROMPT]
    (folder / "gsm8k.jsonl").write_text("\n".join(lines) + "\n")
    return save_checkpoint(model, tokenizer, folder / "model", ""), folder / "gsm8k.jsonl"


def run_rlkit(s: Setup, steps: int, warmup: int, work: Path, rollout_dtype: str) -> dict:
    run_dir = work / "rlkit_run"
    overrides = rlkit_overrides(s, run_dir, rollout_dtype, steps)
    proc = subprocess.run([sys.executable, "-m", "rlkit.run", "recipes/quickstart.yaml", *overrides],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"rlkit run failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "grpo/samples_per_s" in r][warmup:]
    return {
        "samples_per_s": statistics.median(r["grpo/samples_per_s"] for r in steps_rows),
        "tokens_per_s": statistics.median(r["grpo/tokens_per_s"] for r in steps_rows),
        "length": statistics.median(r["grpo/response_length/mean"] for r in steps_rows),
        "steps": len(steps_rows),
        "phases": {phase: statistics.median(r.get(f"grpo/time/{phase}", 0.0) for r in steps_rows) for phase in PHASES},
    }


TRL_SCRIPT = r'''
import json, sys, time
job = json.loads(sys.argv[1])
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
sys.path.insert(0, job["repo"])
from rlkit.rewards.base import Sample
from rlkit.rewards.math import MathReward
from rlkit.recipe import DataConfig
from rlkit.data.tasks import synthetic_splits

reward = MathReward()
def math_reward(prompts, completions, answer, question=None, **kwargs):
    # conversational completions are [{"role": "assistant", "content": text}]; the reward reads the text
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [reward.score(Sample(p, c, a)).score for p, c, a in zip(question or prompts, texts, answer)]

class StepTimer(TrainerCallback):
    def __init__(self): self.times, self.lengths = [], []
    def on_step_begin(self, args, state, control, **kw): self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, model=None, **kw):
        self.times.append(time.perf_counter() - self.t0)
        self.autocast = hasattr(model, "_original_forward")  # accelerate wraps forward (and so generate) in autocast
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs: self.lengths.append(logs["completions/mean_length"])

cfg = DataConfig(num_train=2000, num_eval=16, **job["data"])
train = [] if job["gsm8k"] else synthetic_splits(cfg)[0]
if job["gsm8k"]:  # the same prompt/answer file rlkit reads, as plain text after BOS (data.chat_template=none)
    rows = [{"prompt": "<s>" + r["prompt"], "answer": r["answer"]} for r in map(json.loads, open(job["gsm8k"]))]
elif job["chat"]:  # conversational prompts: TRL renders them with the tokenizer's chat template
    rows = [{"prompt": [{"role": "user", "content": cfg.prompt_template.format(prompt=p.prompt)}],
             "answer": p.answer, "question": p.prompt} for p in train]
else:
    rows = [{"prompt": "<s>" + p.prompt, "answer": p.answer} for p in train]
timer = StepTimer()
trainer = GRPOTrainer(model=job["model_path"], reward_funcs=math_reward, args=GRPOConfig(**job["args"]),
                      train_dataset=Dataset.from_list(rows), callbacks=[timer])
trainer.train()
ref = trainer.ref_model
precision = {"mixed_precision": str(trainer.accelerator.mixed_precision), "weights": str(trainer.model.dtype),
             "reference": str(ref.dtype) if ref is not None else "none", "policy_forward_autocast": timer.autocast,
             "reference_forward_autocast": hasattr(ref, "_original_forward")}
print("RESULT", json.dumps({"times": timer.times, "lengths": timer.lengths, "precision": precision}))
'''


def run_trl(s: Setup, steps: int, warmup: int, work: Path) -> dict:
    job = dict(repo=str(REPO), model_path=s.model_path, chat=s.chat, data=s.data, gsm8k=s.gsm8k,
               args=trl_args(s, work / "trl_out", steps))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # local paths only
    proc = subprocess.run([sys.executable, "-c", TRL_SCRIPT, json.dumps(job)], cwd=work, capture_output=True,
                          text=True, env=env)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(line[len("RESULT "):])
    times, lengths = result["times"][warmup:], result["lengths"][warmup:] or result["lengths"]
    step, length, samples = statistics.median(times), statistics.median(lengths), s.prompts * s.group
    return {"samples_per_s": samples / step, "tokens_per_s": samples * length / step, "length": length,
            "steps": len(times), "precision": result["precision"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--model", default="", help="a local Hugging Face chat model folder")
    parser.add_argument("--lengths", default="arith", choices=("arith", "gsm8k"),
                        help="prompts: two-digit arithmetic, or GSM8K questions under a BPE trained here")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                        help="bf16: mixed precision on both sides (TRL's default); auto: bf16 where this machine "
                             "computes it natively, else fp32")
    parser.add_argument("--new-tokens", type=int, default=0, help="most completion tokens (0: 64, gsm8k 256)")
    parser.add_argument("--rollout-dtype", default=None,
                        help="rlkit's engine dtype (default: the benchmark's precision, which TRL generates in)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is the baseline: pip install trl")
    if args.model and args.lengths == "gsm8k":
        raise SystemExit("--lengths gsm8k builds its own model (a BPE trained on GSM8K); drop --model")
    from rlkit.kernels.precision import auto_dtype, describe_machine

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and auto_dtype("cpu")[0] == "bfloat16")
    rollout_dtype = args.rollout_dtype or ("bfloat16" if bf16 else "float32")
    new_tokens = args.new_tokens or (256 if args.lengths == "gsm8k" else 64)
    with tempfile.TemporaryDirectory() as tmp:
        work, gsm8k = Path(tmp), ""
        if args.lengths == "gsm8k":
            model_path, gsm8k = build_gsm8k(work, GSM8K_MAX_PROMPT + new_tokens)
        else:
            model_path = Path(args.model).resolve() if args.model else build_model(work)
        s = Setup(str(model_path), chat=bool(args.model), bf16=bf16, gsm8k=str(gsm8k), prompts=args.prompts,
                  group=args.group, new_tokens=new_tokens)
        t0 = time.perf_counter()
        ours = run_rlkit(s, args.steps, args.warmup, work, rollout_dtype)
        t1 = time.perf_counter()
        theirs = run_trl(s, args.steps, args.warmup, work)
        t2 = time.perf_counter()
    report(s, args.warmup, rollout_dtype, ours, theirs, (t1 - t0, t2 - t1))


def report(s: Setup, warmup: int, rollout_dtype: str, ours: dict, theirs: dict, walls: tuple[float, float]) -> None:
    model = s.model_path if s.chat else MODEL | ({"max_seq_len": GSM8K_MAX_PROMPT + s.new_tokens} if s.gsm8k else {})
    print(f"GRPO, {s.prompts} prompts x {s.group} samples, <= {s.new_tokens} new tokens, model {model}, "
          f"rlkit rollout.dtype={rollout_dtype}")
    if s.gsm8k:
        print(f"GSM8K questions (byte-level BPE trained here); rlkit trainer.micro_batch_tokens={GSM8K_BUDGET}, packed; "
              "TRL padded (GRPOTrainer has no padding-free option)")
    if s.bf16:
        print(f"rlkit trainer.dtype=bfloat16 (float32 master weights), ref.dtype=bfloat16; TRL {theirs['precision']}")
    else:
        print(f"rlkit trainer.dtype=float32, ref.dtype=float32; TRL {theirs['precision']}")
    print(f"median of {ours['steps']} (rlkit) and {theirs['steps']} (TRL) steps after {warmup} warm-up steps")
    print(f"{'':10s} {'samples/s':>10s} {'tokens/s':>10s} {'len':>6s} {'wall s':>8s}")
    print(f"{'TRL':10s} {theirs['samples_per_s']:10.2f} {theirs['tokens_per_s']:10.1f} {theirs['length']:6.1f} "
          f"{walls[1]:8.0f}")
    print(f"{'rlkit':10s} {ours['samples_per_s']:10.2f} {ours['tokens_per_s']:10.1f} {ours['length']:6.1f} "
          f"{walls[0]:8.0f}")
    print(f"{'ratio':10s} {ours['samples_per_s'] / theirs['samples_per_s']:9.2f}x "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:9.2f}x")
    # Where rlkit's step goes, and the ratio it would reach if generation cost nothing: the reference forward
    # and the policy's forward/backward are the same arithmetic in any GRPO implementation of this setup.
    phases, trl_step = ours["phases"], s.prompts * s.group / theirs["samples_per_s"]
    print("\nrlkit step, median seconds per phase")
    for phase, seconds in phases.items():
        print(f"  {phase:12s} {seconds:6.2f}")
    floor = phases["reference"] + phases["train"]
    print(f"TRL step {trl_step:.2f} s; reference + train alone {floor:.2f} s: with free generation, "
          f"scoring and sync the ratio would be at most {trl_step / floor:.2f}x")


if __name__ == "__main__":
    main()
