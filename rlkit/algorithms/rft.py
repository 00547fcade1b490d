"""Rejection-sampling fine-tuning (`rft`) and distillation (`distill`): sample, keep what the rewards accept, SFT.

- rft: `stage.samples` completions per prompt from the current policy through the run's rollout pool; the
  recipe's rewards judge them and the accepted ones (`stage.keep`: the best per prompt, or all distinct) become
  the SFT set (Llama 3's rejection sampling).
- distill: the same from a teacher (`stage.teacher`, a local checkpoint) served by an engine pool of its own;
  completions whose answer disagrees with the gold answer (verdict other than correct) are dropped.

Prompts: stage.steps × stage.batch_size of the training split (all of it when smaller), drawn once at the
start of the stage. The kept examples are written to RUN_DIR/<checkpoint name>.examples.jsonl.
"""

from __future__ import annotations

import json
import random

from rlkit.algorithms import sft
from rlkit.algorithms.common import StageContext, sampled_reply
from rlkit.recipe import RecipeError
from rlkit.rewards.base import Verdict
from rlkit.rollout.generations import token_list


def accept(texts: list[str], scores: list[float], verdicts: list[Verdict], valid: list[bool], keep: str) -> list[int]:
    """Indices of one prompt's completions to keep: valid and judged correct; "best" keeps the highest score
    (the shortest on ties, then the first), "all" every distinct text.

    >>> C, W = Verdict.CORRECT, Verdict.WRONG
    >>> accept(["12", "13", "012", "12"], [1.0, 0.0, 1.0, 1.0], [C, W, C, C], [True] * 4, "best")
    [0]
    >>> accept(["12", "13", "012", "12"], [1.0, 0.0, 1.0, 1.0], [C, W, C, C], [True, True, True, False], "all")
    [0, 2]
    >>> accept(["1", "2"], [0.0, 0.0], [W, W], [True, True], "best")
    []
    """
    ok = [i for i, (v, good) in enumerate(zip(verdicts, valid)) if good and v == Verdict.CORRECT]
    if keep == "best":
        return [min(ok, key=lambda i: (-scores[i], len(texts[i]), i))] if ok else []
    seen: set[str] = set()
    return [i for i in ok if not (texts[i] in seen or seen.add(texts[i]))]


def sampled_example(prompt: list[int], completion, eos_id: int) -> sft.Example:
    """A kept sample as an SFT example: its reply trained, or of a multi-turn episode only the sampled tokens (the
    environment's stay masked, as in GRPO), with EOS appended when it was cut short.

    >>> from rlkit.rollout.generations import Completion
    >>> sampled_example([1, 2], Completion((7, 8), (-0.1, -0.2), "78", False), eos_id=0)
    ([1, 2, 7, 8, 0], [0, 0, 1, 1, 1])
    >>> from types import SimpleNamespace  # an episode: a tool call (7), the tool's reply (50), the answer (8)
    >>> sampled_example([1], SimpleNamespace(token_ids=(7, 50, 8), loss_mask=(1, 0, 1), finished=True), eos_id=0)
    ([1, 7, 50, 8], [0, 1, 0, 1])
    """
    mask = getattr(completion, "loss_mask", None)
    if mask is None:
        return sft.prompt_reply(prompt, sampled_reply(completion, eos_id))
    ids, mask = token_list(completion.token_ids), list(mask)
    if not completion.finished:
        ids, mask = ids + [eos_id], mask + [1]
    return list(prompt) + ids, [0] * len(prompt) + mask


def collect(ctx: StageContext, pool) -> tuple[list[sft.Example], dict[str, float]]:
    """Sample from `pool`, score with the recipe's rewards and keep the accepted completions."""
    stage, train = ctx.stage, ctx.data.problems
    problems = random.Random(ctx.seed()).sample(train, min(stage.steps * stage.batch_size, len(train)))
    n, eos = stage.samples, ctx.data.renderer.eos_id
    exp = ctx.experience_maker(pool).make(problems, n, ctx.cfg.rollout.temperature, ctx.seed())  # P x n
    texts, scored, prompts = exp.texts, exp.scored, exp.repeated_prompts()  # (P*n,) each
    verdicts = [r.verdict for r in scored.results]
    examples, rows, covered = [], [], 0
    for i, problem in enumerate(problems):
        span = exp.group(i)
        kept = accept(texts[span], scored.scores[span], verdicts[span], scored.valid[span], stage.keep)
        covered += bool(kept)
        for j in kept:
            examples.append(sampled_example(prompts[span][j], exp.completions[span][j], eos))
            rows.append({"prompt": problem.prompt, "gold": problem.answer, "completion": texts[span][j]})
    with open(ctx.logger.run_dir / f"{ctx.checkpoint_name}.examples.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    metrics = {
        "sample_accuracy": sum(v == Verdict.CORRECT for v in verdicts) / len(verdicts),
        "acceptance_rate": len(examples) / len(verdicts),  # kept samples / sampled
        "prompt_coverage": covered / len(problems),  # prompts with at least one kept sample
        "num_examples": float(len(examples)),
    }
    return examples, metrics


def train(ctx: StageContext) -> None:
    examples = ctx.loop.restored("examples")  # a resumed stage keeps the set it collected
    if examples is None:
        if ctx.stage.kind == "distill":
            teacher = ctx.workers.cluster.rollout_pool(ctx.stage.teacher)
            try:
                examples, metrics = collect(ctx, teacher)
            finally:
                teacher.close()
        else:
            examples, metrics = collect(ctx, ctx.workers.pool)
        ctx.logger.log({f"{ctx.prefix}/{k}": v for k, v in metrics.items()})
        print(f"stage {ctx.index} ({ctx.stage.kind}): kept {len(examples)} samples "
              f"(acceptance {metrics['acceptance_rate']:.3f}, prompts covered {metrics['prompt_coverage']:.3f})",
              flush=True)
        if not examples:
            raise RecipeError(f"stages.{ctx.index}: no sampled completion was judged correct; nothing to train on "
                              f"(raise stages.{ctx.index}.samples, or start from a stronger model)")
    sft.fit(ctx, examples, extra={"examples": examples})
