"""The policy update at GSM8K lengths: padded vs packed vs a token budget, with and without gradient checkpointing
(and with `--compile`, trainer.compile), one run, ratios against the padded update.

    python bench/lengths.py [--prompts 8] [--group 8] [--micro-batch 64] [--budget 4096] [--repeats 3] [--compile]
                            [--device cpu|cuda] [--precision auto|float32|bfloat16]

Lengths: a byte-level BPE (vocabulary 2048) is trained at run time on the shipped GSM8K file
(data/gsm8k_test.jsonl). A step batch is `--prompts` questions, each with `--group` completions whose lengths are
those of GSM8K worked answers drawn at random (completions of one prompt differ in length, as sampled ones do);
rows are prompt-major, as GRPO builds them. Token ids are random: the update's cost does not depend on them.
Model: a randomly initialised Llama (`--hidden`, `--layers`), trained in `--precision` (trainer.dtype; `auto`, the
default: bf16 mixed precision where the device computes bf16 natively, else float32). Each configuration runs
`ShardedTrainer.step` (on-policy GRPO's PolicyLoss, token-mean) in a process of its own, one warm-up update and then
`--repeats` timed ones:
- padded: micro-batches of `--micro-batch` consecutive rows (trainer.micro_batch_size, 64 by default: the whole
  step batch), each right-padded to its longest row;
- budget: trainer.micro_batch_tokens `--budget` as well: rows binned by length (first-fit decreasing), so each
  micro-batch holds rows of similar length, then right-padded;
- packed: trainer.packing, each micro-batch's rows as one sequence, attention within each row (rlkit.training.attention's
  per-row sdpa, what trainer.packing loads with sdpa);
- packed + budget: both;
- "(dense mask)": the same packed rows through transformers' own sdpa, which attends over a dense (T, T)
  block-diagonal mask of the micro-batch's T tokens (what trainer.packing ran before rlkit.training.attention): the baseline
  of the per-row attention, same run.
tokens/s counts real (prompt + completion) tokens per second of update, median, under glibc's default allocator
(as a trainer runs). Memory is measured in a second process per configuration: the peak resident memory of one
update after the warm-up minus the resident memory just before it (Linux: VmHWM reset via /proc/self/clear_refs;
glibc's mmap threshold pinned at 64 KiB so a freed tensor leaves the resident set): the update's activations,
gradients and temporaries; weights and optimizer state are resident before. The pinned threshold costs a page fault
per page of every large allocation (1.25-1.7x the update's time here, more for some layouts than others), so no
update is timed under it. `--device cuda` runs the trainer on the GPU (the Triton log-prob kernel) and takes the CUDA
allocator's peak above what it held before that update. Only ratios from one run compare: this
machine's speed varies with its load. `--interleave` times every configuration in one process, their updates in
turn round after round, so a change of load falls on all alike (no memory column then).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K = REPO / "data" / "gsm8k_test.jsonl"
VOCAB = 2048
CONFIGS = {  # name -> TrainerConfig fields beyond micro_batch_size ("budget" is filled in with the token budget)
    "padded": {},
    "budget": {"micro_batch_tokens": "budget"},
    "packed": {"packing": True},
    "packed (dense mask)": {"packing": True, "dense_mask": True},
    "packed + budget": {"packing": True, "micro_batch_tokens": "budget"},
    "packed + budget (dense mask)": {"packing": True, "micro_batch_tokens": "budget", "dense_mask": True},
}


def train_bpe(path: Path = GSM8K, vocab: int = VOCAB):
    """A byte-level BPE (tokenizers.Tokenizer) trained on GSM8K's questions and answers; <pad>, <s>, </s> are ids
    0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((r["question"] + "\n" + r["answer"] for r in rows), trainer=trainer)
    return tok


def gsm8k_lengths(path: Path = GSM8K, vocab: int = VOCAB) -> tuple[list[int], list[int]]:
    """Token counts of GSM8K questions and worked answers under `train_bpe`'s tokenizer."""
    tok, rows = train_bpe(path, vocab), [json.loads(line) for line in path.read_text().splitlines()]
    questions = [len(e.ids) for e in tok.encode_batch([r["question"] for r in rows])]
    answers = [len(e.ids) for e in tok.encode_batch([r["answer"] for r in rows])]
    return questions, answers


def step_lengths(questions: list[int], answers: list[int], prompts: int, group: int, seed: int = 0):
    """(prompt, completion) lengths of one step batch, prompt-major."""
    rng = random.Random(seed)
    out = []
    for q in rng.sample(questions, prompts):
        out += [(q, a) for a in rng.choices(answers, k=group)]
    return out


def build_model(folder: Path, hidden: int, layers: int) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


# -- one configuration, in its own process ---------------------------------------------------------------------
def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def rss_mb(field: str) -> float:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def policy_batch(lengths: list):
    """An on-policy GRPO batch of random tokens with these (prompt, completion) lengths."""
    import torch

    from rlkit.training.losses import token_normalizer
    from rlkit.training.batches import PolicyBatch, pack_sequences

    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    tokens = pack_sequences([rand(p) for p, _ in lengths], [rand(c) for _, c in lengths], pad_id=0)
    mask = tokens.response_mask
    return PolicyBatch(tokens, mask, None, None, torch.zeros(mask.shape), torch.randn(len(tokens), generator=g),
                       float(token_normalizer(mask, "token-mean", 0)))


def grpo_loss():
    """On-policy GRPO's loss as the recipe's defaults make it (no reference: ref.kl_coef 0)."""
    from rlkit.training.losses import PolicyLoss

    return PolicyLoss()


def make_trainer(fields: dict, model: str):
    from rlkit.recipe import TrainerConfig
    from rlkit.training.trainer import ShardedTrainer

    fields = dict(fields)
    dense = fields.pop("dense_mask", False)
    impl = "auto" if device() == "cuda" else "torch"  # the Triton kernel on CUDA, the chunked one on CPU
    trainer = ShardedTrainer(TrainerConfig(**fields, logprob_impl=impl), model, lr=1e-6, warmup_steps=1)
    if dense:  # the same packed rows through transformers' sdpa, over its dense (T, T) block-diagonal mask
        trainer.model.lm.set_attn_implementation("sdpa")
    return trainer


def run_interleaved(job: dict) -> list[dict]:
    """--interleave: every configuration's trainer in this one process, their updates taken in turn, round after
    round, so a change in the machine's load falls on all of them alike. No memory column."""
    batch = policy_batch(job["lengths"])
    trainers = [make_trainer(fields, job["model"]) for fields in job["variants"]]
    times = [[] for _ in trainers]
    for r in range(job["repeats"] + 1):  # round 0 warms up (and compiles)
        for trainer, seconds in zip(trainers, times):
            seconds.append(timed_step(trainer, batch))
    return [{"seconds": statistics.median(t[1:]), "first": t[0], "peak_mb": float("nan")} | token_counts(tr, batch)
            for tr, t in zip(trainers, times)]


def device() -> str:
    """Where the trainer runs: "cuda" when the parent's --device cuda left a GPU visible (the trainer takes it)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed_step(trainer, batch) -> float:
    import torch

    t0 = time.perf_counter()
    trainer.step(grpo_loss(), batch)  # returns floats, so the GPU has finished by then; synchronize anyway
    if device() == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_one(job: dict) -> dict:
    """One configuration: a warm-up update, then `repeats` timed ones; or with job["memory"], one measured update
    after the warm-up. Peak memory: the resident set's on CPU, the CUDA allocator's on a GPU, each above what was
    held before that update."""
    import torch

    batch, trainer = policy_batch(job["lengths"]), make_trainer(job["trainer"], job["model"])
    first = timed_step(trainer, batch)  # warm-up: optimizer state allocated, and trainer.compile's compile paid
    if not job.get("memory"):
        times = [timed_step(trainer, batch) for _ in range(job["repeats"])]
        return {"seconds": statistics.median(times), "first": first} | token_counts(trainer, batch)
    trainer.optimizer.zero_grad(set_to_none=True)
    cuda = device() == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb("VmRSS")
        peak_rss_reset()
    timed_step(trainer, batch)
    return {"peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mb("VmHWM")) - before}


def token_counts(trainer, batch) -> dict:
    """The trainer's micro-batches of `batch`, its real tokens, and the token positions the model runs over
    (padding included; packed: the real tokens alone)."""
    lengths = batch.tokens.attention_mask.sum(-1)
    plans = trainer.micro_batches(batch.tokens)
    computed = lengths.sum() if trainer.cfg.packing else sum(len(rows) * lengths[rows].max() for rows in plans)
    return {"micro_batches": len(plans), "tokens": int(lengths.sum()), "computed": int(computed)}


def spawn(job: dict) -> dict:
    env = dict(os.environ)
    if job.get("memory"):
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a pinned threshold: freed tensors leave the resident set
    if job["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{job['trainer']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=64, help="rows per micro-batch (trainer.micro_batch_size)")
    parser.add_argument("--budget", type=int, default=4096, help="tokens per micro-batch (trainer.micro_batch_tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also the budget rows with trainer.compile")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which of them, comma-separated (padded first)")
    parser.add_argument("--interleave", action="store_true",
                        help="time all configurations in one process, in turn (no memory column)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the trainer on the GPU (Triton log-prob kernel; peak memory from the CUDA allocator)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"),
                        help="trainer.dtype (auto: bf16 where the device computes it natively, else float32)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job)
        print("RESULT", json.dumps(run_interleaved(job) if "variants" in job else run_one(job)), flush=True)
        return
    from rlkit.kernels.precision import describe_machine
    from rlkit.training.precision import resolve

    print(describe_machine(), flush=True)  # the numbers below depend on it (native bf16 or not)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible")
    dtype = resolve(args.precision, args.device, "--precision")[0]  # an emulated bf16 warns with its slowdown
    questions, answers = gsm8k_lengths()
    lengths = step_lengths(questions, answers, args.prompts, args.group)
    rows = [p + c for p, c in lengths]
    budget = args.budget
    print(f"GSM8K lengths (byte-level BPE, vocab {VOCAB}): prompt median {statistics.median(questions)}, completion "
          f"median {statistics.median(answers)}; step batch {args.prompts} x {args.group} rows of {min(rows)}-"
          f"{max(rows)} tokens (mean {statistics.mean(rows):.0f}); micro-batch {args.micro_batch} rows, token "
          f"budget {budget}; Llama {args.hidden} wide x {args.layers} layers, {dtype}, sdpa, "
          f"{'CUDA' if args.device == 'cuda' else f'{os.cpu_count()} CPUs'}; median of {args.repeats} updates")
    names = args.configs.split(",")
    variants = [(name, CONFIGS[name], ckpt, False) for ckpt in (False, True) for name in names]
    if args.compile:
        variants += [(name, CONFIGS[name], False, True) for name in names if "budget" in name]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", args.hidden, args.layers)
        trainers = [{k: budget if v == "budget" else v for k, v in fields.items()}
                    | {"micro_batch_size": args.micro_batch, "gradient_checkpointing": ckpt, "compile": comp,
                       "dtype": dtype}
                    for _, fields, ckpt, comp in variants]
        base = {"lengths": lengths, "model": model, "repeats": args.repeats, "device": args.device}
        if args.interleave:
            out = spawn(base | {"variants": trainers, "trainer": "all"})
        else:
            out = [spawn(base | {"trainer": t}) | spawn(base | {"trainer": t, "memory": True}) for t in trainers]
        results = [(name, ckpt, comp, r) for (name, _, ckpt, comp), r in zip(variants, out)]
    report(results)


def report(results: list) -> None:
    base = {ckpt: r for name, ckpt, comp, r in results if name == "padded" and not comp}
    print("| update | checkpointing | micro-batches | computed / real tokens | tokens/s | vs padded | "
          "peak MB | peak vs no checkpointing | first update s |")
    print("|---|---|---|---|---|---|---|---|---|")
    no_ckpt = {name: r for name, ckpt, comp, r in results if not ckpt and not comp}
    for name, ckpt, comp, r in results:
        speed = r["tokens"] / r["seconds"]
        label = name + (" + compile" if comp else "")
        measured = r["peak_mb"] == r["peak_mb"]  # NaN under --interleave
        peak = f"{r['peak_mb']:.0f}" if measured else "-"
        mem = f"{r['peak_mb'] / no_ckpt[name]['peak_mb']:.2f}" if ckpt and measured and name in no_ckpt else ""
        print(f"| {label} | {'on' if ckpt else 'off'} | {r['micro_batches']} | {r['computed'] / r['tokens']:.2f} "
              f"| {speed:.0f} | {speed / (base[ckpt]['tokens'] / base[ckpt]['seconds']):.2f}x | {peak} "
              f"| {mem} | {r['first']:.1f} |")


if __name__ == "__main__":
    main()
