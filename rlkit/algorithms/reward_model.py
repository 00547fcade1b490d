"""Reward model training (`kind: reward_model`): a Bradley-Terry outcome model from preference pairs, or a process
reward model from stepwise supervision, on the policy's transformer (or `stage.model`'s: an earlier stage's policy or
a folder with the policy's tokenizer) with a new score head (rlkit.training.reward_model). The stage's checkpoint is a
Hugging Face sequence- (or token-) classification folder; the policy is not changed, and the next stage starts from
the policy this one started from.

Where the examples come from (`stage.pairs`):
- `dataset`: a preference dataset (TRL's format, text or conversational, with TRL's optional `margin` column), or
  with `data.format: stepwise` TRL's stepwise supervision (a PRM). The held-out examples are the stage data's
  eval_source, else its first num_eval rows (rlkit.data.prepare.reward_model_split).
- `policy`: `samples` answers per training prompt from the current policy, judged by the recipe's rewards (those
  available before this stage: rlkit.runtime.scoring.live_rewards); each distinct wrong answer is paired with a
  correct one (the gold solution when none is correct). The held-out pairs are sampled the same way on the recipe's
  held-out prompts, which neither the policy nor the reward model trains on.

Held-out pairwise accuracy (r_chosen > r_rejected) and mean margin (r_chosen - r_rejected) are logged as
`<stage>/eval/accuracy` and `<stage>/eval/margin` every logging.eval_every steps and at the end (a PRM: per-step
accuracy), and written into the checkpoint's rlkit_stage.json with how the stage rendered its sequences, which the
`model` reward (rlkit.rewards.model) renders prompts and completions by. With `pairs: policy` the accuracy is also
logged apart on the pairs of two samples (`eval/accuracy_sampled`) and on those against the gold solution
(`eval/accuracy_gold`, with their share `eval/gold_fraction`).

Departures from TRL's RewardTrainer: the loss is summed over the step batch's pairs and divided by their count
(the same value as TRL's mean, independent of micro-batches and ranks); no dropout in the score head (TRL disables
dropout by default too).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from rlkit.algorithms.common import StageContext, sampled_reply
from rlkit.data.tasks import BatchSampler
from rlkit.recipe import RecipeConfig, RecipeError, stage_updates
from rlkit.recipe.stage_kinds import earlier_policy
from rlkit.rewards.base import Verdict
from rlkit.training.batches import RewardPairBatch, StepBatch
from rlkit.training.reward_model import PairwiseLoss, StepLoss, bradley_terry_loss, last_token, scored_tokens

EVAL_ROWS = 256  # held-out rows scored per call


def contrast(texts: list[str], verdicts: list[Verdict], valid: list[bool]) -> list[tuple[int | None, int]]:
    """(chosen, rejected) pairs of one prompt's samples: each distinct wrong answer against a distinct correct one,
    taken in turn, or against the gold solution (None) when no sample is correct.

    >>> C, W = Verdict.CORRECT, Verdict.WRONG
    >>> contrast(["4", "5", "4", "6", "5"], [C, W, C, W, W], [True] * 5)
    [(0, 1), (0, 3)]
    >>> contrast(["5", "6"], [W, W], [True, False])  # the excluded sample pairs with nothing
    [(None, 0)]
    """
    def distinct(wanted: bool) -> list[int]:
        seen: set[str] = set()
        return [i for i, (v, ok) in enumerate(zip(verdicts, valid))
                if ok and (v == Verdict.CORRECT) == wanted and not (texts[i] in seen or seen.add(texts[i]))]

    right, wrong = distinct(True), distinct(False)
    return [(right[k % len(right)] if right else None, w) for k, w in enumerate(wrong)]


def sample_pairs(ctx: StageContext, problems: list, seed: int) -> tuple[list[tuple], list[bool]]:
    """(prompt ids, chosen ids, rejected ids, margin 0) for `problems` from `stage.samples` answers of the policy,
    and per pair whether its chosen side is the gold solution (no sample was correct) rather than a sample."""
    exp = ctx.experience_maker().make(problems, ctx.stage.samples, ctx.cfg.rollout.temperature, seed)
    renderer, pairs, gold, texts = ctx.data.renderer, [], [], exp.texts  # texts: a list built per call, so once
    for i, problem in enumerate(problems):
        span, completions = exp.group(i), exp.completions[exp.group(i)]
        verdicts = [r.verdict for r in exp.scored.results[span]]
        for chosen, rejected in contrast(texts[span], verdicts, exp.scored.valid[span]):
            chosen_ids = (renderer.reply_ids(problem, problem.solution) if chosen is None
                          else sampled_reply(completions[chosen], renderer.eos_id))
            pairs.append((exp.prompt_ids[i], chosen_ids, sampled_reply(completions[rejected], renderer.eos_id), 0.0))
            gold.append(chosen is None)
    return pairs, gold


def pair_batch(items: list[tuple], pad_id: int, num_pairs: int = 0) -> RewardPairBatch:
    """Rows alternate chosen, rejected (prompt + reply), each scored at its last non-pad token."""
    rows = [list(p) + list(reply) for p, c, r, _ in items for reply in (c, r)]
    tokens = scored_tokens(rows, [[last_token(row, pad_id)] for row in rows], pad_id)  # (2P, L)
    margins = torch.tensor([m for *_, m in items for _ in range(2)], dtype=torch.float32)  # (2P,)
    return RewardPairBatch(tokens, margins, num_pairs or len(items))


def step_batch(items: list[tuple], pad_id: int, normalizer: float = 0.0) -> StepBatch:
    """Rows of prompt + steps, each step scored (and labelled) at its separator's last token."""
    tokens = scored_tokens([ids for ids, _, _ in items], [ends for _, ends, _ in items], pad_id)  # (B, L)
    labels = torch.zeros(tokens.response_mask.shape)  # (B, L-1)
    for k, (_, ends, values) in enumerate(items):
        labels[k, ends] = torch.tensor(values, dtype=torch.float32)
    return StepBatch(tokens, labels, normalizer or float(sum(len(ends) for _, ends, _ in items)))


def held_out_metrics(group, items: list[tuple], pad_id: int, process: bool,
                     against_gold: list[bool] = ()) -> dict[str, float]:
    """The reward model's held-out metrics: pairwise accuracy, mean margin and loss (a PRM: per-step accuracy and
    loss). With `against_gold` (per pair: its chosen side is the gold solution, not a sample), pairwise accuracy
    also apart on the pairs of two sampled answers (`accuracy_sampled`, the ranking RL on the model's reward
    uses) and on those of the gold solution against a wrong sample (`accuracy_gold`)."""
    per_row = 1 if process else 2
    outcomes = []  # per pair (r_chosen, r_rejected), or per step (d, label)
    for start in range(0, len(items), EVAL_ROWS // per_row):
        chunk = items[start : start + EVAL_ROWS // per_row]
        padded = chunk + chunk[-1:] * (-len(chunk) % group.world_size)  # whole shares for every rank
        batch = step_batch(padded, pad_id) if process else pair_batch(padded, pad_id)
        scores = group.scores(batch.tokens)[: len(chunk) * per_row]  # (rows, L-1)
        mask = batch.tokens.response_mask[: len(chunk) * per_row].bool()
        if process:
            outcomes += list(zip(scores[mask].tolist(), batch.labels[: len(chunk)][mask].tolist()))
        else:
            rewards = scores.sum(-1)
            outcomes += list(zip(rewards[0::2].tolist(), rewards[1::2].tolist()))
    first, second = (torch.tensor(v) for v in zip(*outcomes))
    if process:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(first, second)
        return {"accuracy": float(((first > 0).float() == second).float().mean()), "loss": float(loss)}
    right = (first > second).float()  # (P,)
    metrics = {"accuracy": float(right.mean()), "margin": float((first - second).mean()),
               "loss": float(bradley_terry_loss(first, second).mean())}
    gold = torch.tensor(list(against_gold), dtype=torch.bool)
    for name, part in (("accuracy_sampled", ~gold), ("accuracy_gold", gold)) if len(gold) else ():
        if part.any():
            metrics[name] = float(right[part].mean())
    return metrics


def examples(ctx: StageContext) -> tuple[list[tuple], list[tuple], list[bool]]:
    """(training, held-out) examples: the dataset's, or pairs sampled from the policy (kept with resume points); and
    for sampled held-out pairs, whether each one's chosen side is the gold solution (held_out_metrics)."""
    data, stage = ctx.data, ctx.stage
    if stage.pairs == "dataset":
        if data.steps:
            return data.steps, data.held_out.steps, []
        return ([(*p, m) for p, m in zip(data.pairs, data.margins)],
                [(*p, m) for p, m in zip(data.held_out.pairs, data.held_out.margins)], [])
    if ctx.loop.restored("pairs") is not None:
        restored = ctx.loop.restored
        return restored("pairs"), restored("held_out_pairs"), restored("held_out_gold") or []
    problems = random.Random(ctx.seed()).sample(data.problems, min(stage.steps * stage.batch_size, len(data.problems)))
    (train, _), (held, gold) = sample_pairs(ctx, problems, ctx.seed()), sample_pairs(ctx, ctx.held_out, ctx.seed() + 1)
    if not train or not held:
        raise RecipeError(f"stages.{ctx.index}: the policy's samples gave no wrong answer to pair on the "
                          f"{'training' if not train else 'held-out'} prompts; raise stages.{ctx.index}.samples or "
                          "rollout.temperature, or train on a preference dataset (pairs: dataset)")
    ctx.logger.log({f"{ctx.prefix}/num_pairs": len(train), f"{ctx.prefix}/eval/num_pairs": len(held),
                    f"{ctx.prefix}/eval/gold_fraction": sum(gold) / len(held)})
    return train, held, gold


def backbone_path(cfg: RecipeConfig, index: int, run_dir: Path, policy: str) -> str:
    """The checkpoint stage `index`'s reward model starts from: its `model` (an earlier stage's policy under
    run_dir, or a folder with the policy's tokenizer, since the pairs are the policy's token ids), else `policy`."""
    from rlkit.training.modeling import load_tokenizer

    name = cfg.stages[index].model
    if not name:
        return policy
    folder = earlier_policy(cfg.stages, index, name)  # or a folder: validated when the recipe loaded
    path = str(run_dir / "checkpoints" / folder) if folder else name
    if load_tokenizer(path).get_vocab() != load_tokenizer(policy).get_vocab():
        raise RecipeError(f"stages.{index}.model: '{name}' has another tokenizer than the policy, whose token ids "
                          "the pairs are; start the reward model from a model with the policy's tokenizer")
    return path


def rendering(ctx: StageContext, process: bool) -> dict:
    """How the stage rendered its sequences, for the `model` reward to render prompts and completions the same way."""
    renderer, data = ctx.data.renderer, ctx.cfg.stage_data(ctx.index)
    return {"kind": "process" if process else "outcome", "chat": renderer.chat, "system_prompt": data.system_prompt,
            "prompt_template": data.prompt_template, "stop_ids": sorted(renderer.stop_ids),
            "step_separator": data.step_separator}


def train(ctx: StageContext, recipe_yaml: str) -> str:
    """Train the stage's reward model; returns its checkpoint folder."""
    stage, pad_id, process = ctx.stage, ctx.data.renderer.pad_id, bool(ctx.data.steps)
    backbone = backbone_path(ctx.cfg, ctx.index, ctx.run_dir, ctx.model_path)
    train_items, held_items, held_gold = examples(ctx)
    loss = StepLoss() if process else PairwiseLoss(ctx.cfg.algo.rm_center_coef)
    group = ctx.workers.cluster.reward_model_group(backbone, ctx.lr, ctx.warmup_steps,
                                                   stage_updates(ctx.cfg, ctx.index), process)

    def evaluate(step: int | None) -> dict[str, float]:
        every = ctx.cfg.logging.eval_every
        if step is not None and (not every or (step + 1) % every or step == stage.steps - 1):
            return {}
        metrics = held_out_metrics(group, held_items, pad_id, process, held_gold)
        ctx.logger.log({f"{ctx.prefix}/eval/{k}": v for k, v in metrics.items()})
        return metrics

    with ctx.workers.releasing(group):
        sampler = BatchSampler(train_items, stage.batch_size, ctx.seed())
        kept = ({"pairs": train_items, "held_out_pairs": held_items, "held_out_gold": held_gold}
                if stage.pairs == "policy" else None)
        for step in ctx.loop.steps(sampler, groups={"reward_model": group}, extra=kept, evaluate=evaluate):
            items = sampler.next()
            batch = step_batch(items, pad_id) if process else pair_batch(items, pad_id)
            update = group.step(loss, batch)
            if ctx.log.step(step, update.metrics()):
                ctx.log.show(loss=f"{update.stats.loss:.3f}", accuracy=f"{update.stats.accuracy:.2f}")
        held = evaluate(None)
        parts = "".join(f"; {held[key]:.3f} on the {held_gold.count(gold)} {what}" for key, gold, what in (
            ("accuracy_sampled", False, "pairs of two samples"),
            ("accuracy_gold", True, "of the gold solution against a wrong sample")) if key in held)
        print(f"stage {ctx.index} (reward_model): held-out {'step' if process else 'pairwise'} accuracy "
              f"{held['accuracy']:.3f} on {len(held_items)} {'examples' if process else 'pairs'}{parts}", flush=True)
        folder = ctx.run_dir / "checkpoints" / ctx.checkpoint_name
        return group.save(str(folder), ctx.model_path, recipe_yaml,
                          {"stage": ctx.index, "kind": stage.kind, "reward_model": rendering(ctx, process),
                           "held_out": held})
