"""Iterative online DPO (`dpo` with `pairs: online`): sample from the current policy, label, train; repeat.

The stage's steps are split evenly over `stage.rounds`. Each round samples `stage.samples` completions for
(its steps × batch_size) prompts from the current policy, lets the recipe's rewards label them, and pairs the
best correct sample (the gold solution when none is correct) against the worst wrong one; prompts with no
wrong sample give no pair. The reference stays the stage's starting model. After every round the policy is
evaluated on the held-out set: `<stage>/round/accuracy` with `<stage>/round/index`.
"""

from __future__ import annotations

import random

from rlkit.algorithms.common import StageContext, sampled_reply
from rlkit.algorithms import dpo
from rlkit.algorithms.dpo import train_step
from rlkit.data.tasks import BatchSampler
from rlkit.rewards.base import Verdict
from rlkit.rollout.generations import token_list


def pick_pair(texts: list[str], scores: list[float], verdicts: list[Verdict], valid: list[bool]):
    """(chosen index or None for the gold solution, rejected index) for one prompt's samples, or None.

    >>> C, W = Verdict.CORRECT, Verdict.WRONG
    >>> pick_pair(["12", "013", "12 ", "9"], [1.0, -1.0, 1.0, 0.0], [C, W, C, W], [True] * 4)
    (0, 1)
    >>> pick_pair(["1", "2"], [0.0, 0.0], [W, W], [True, True])  # none correct: the gold answer is chosen
    (None, 0)
    >>> pick_pair(["1", "2"], [1.0, 0.0], [C, W], [True, False]) is None  # the wrong one was excluded
    True
    """
    ok = [i for i, good in enumerate(valid) if good]
    right = [i for i in ok if verdicts[i] == Verdict.CORRECT]
    wrong = [i for i in ok if verdicts[i] != Verdict.CORRECT]
    if not wrong:
        return None
    chosen = min(right, key=lambda i: (-scores[i], len(texts[i]), i)) if right else None
    return chosen, min(wrong, key=lambda i: (scores[i], i))


def round_of(step: int, steps: int, rounds: int) -> int:
    """The round a step belongs to when `steps` are split evenly over `rounds`.

    >>> [round_of(s, 10, 3) for s in range(10)]
    [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    return next(r for r in range(rounds) if step < _round_end(r, steps, rounds))


def _round_end(r: int, steps: int, rounds: int) -> int:
    return -(-(r + 1) * steps // rounds)  # ceil((r + 1) * steps / rounds)


def sample_pairs(ctx: StageContext, round_index: int, num_prompts: int) -> tuple[list, dict[str, float]]:
    """One round's pairs from the current policy, and what sampling them found."""
    n, train, renderer = ctx.stage.samples, ctx.data.problems, ctx.data.renderer
    problems = random.Random(ctx.seed() * 7919 + round_index).sample(train, min(num_prompts, len(train)))
    exp = ctx.experience_maker().make(problems, n, ctx.cfg.rollout.temperature, ctx.seed() * 7919 + round_index)
    texts, scored = exp.texts, exp.scored
    verdicts = [r.verdict for r in scored.results]
    pairs, gold_chosen = [], 0
    for i, problem in enumerate(problems):
        span = exp.group(i)
        picked = pick_pair(texts[span], scored.scores[span], verdicts[span], scored.valid[span])
        if picked is None:
            continue
        chosen, rejected = picked
        gold_chosen += chosen is None
        completions = exp.completions[span]
        chosen_ids = (renderer.reply_ids(problem, problem.solution) if chosen is None
                      else sampled_reply(completions[chosen], renderer.eos_id))
        pairs.append((exp.prompt_ids[i], chosen_ids, token_list(completions[rejected].token_ids)))
    return pairs, {
        "round/sample_accuracy": sum(v == Verdict.CORRECT for v in verdicts) / len(verdicts),
        "round/num_pairs": float(len(pairs)),
        "round/gold_chosen": gold_chosen / max(len(pairs), 1),  # pairs whose chosen is the gold solution
    }


def train(ctx: StageContext) -> None:
    stage = ctx.stage
    state = {"pairs": ctx.loop.restored("pairs") or [], "round": ctx.loop.restored("round")}  # kept with resume points
    state["round"] = -1 if state["round"] is None else state["round"]
    ref = ctx.workers.cluster.reference(ctx.model_path, ctx.workers.trainer)
    sampler = BatchSampler(state["pairs"] or [None], stage.batch_size, ctx.seed())
    with ctx.workers.releasing(ref):
        for step in ctx.loop.steps(sampler, extra=state):
            r = round_of(step, stage.steps, stage.rounds)
            if r != state["round"]:
                if state["round"] >= 0:
                    end_round(ctx, state["round"])
                start = _round_end(r - 1, stage.steps, stage.rounds) if r else 0
                prompts = (_round_end(r, stage.steps, stage.rounds) - start) * stage.batch_size
                pairs, metrics = sample_pairs(ctx, r, prompts)
                ctx.logger.log({f"{ctx.prefix}/{k}": v for k, v in metrics.items()}
                               | {f"{ctx.prefix}/round/index": r})
                state["pairs"], state["round"] = pairs, r
                if pairs:
                    sampler.reset(pairs)
            if state["pairs"]:  # a round where every sample was correct has nothing to learn from
                train_step(ctx, ref, step, sampler.next())
        end_round(ctx, state["round"])


def end_round(ctx: StageContext, round_index: int) -> None:
    """Engines take the round's weights (the next round samples from them); held-out accuracy is logged."""
    ctx.workers.sync_policy()
    metrics = ctx.evaluate(log=False)
    ctx.logger.log({f"{ctx.prefix}/round/accuracy": metrics["accuracy"], f"{ctx.prefix}/round/index": round_index})
    print(f"stage {ctx.index} (online dpo): round {round_index} held-out accuracy {metrics['accuracy']:.3f}", flush=True)


def train_dpo(ctx: StageContext) -> None:
    """The dpo kind's train: DPO on pairs from a dataset or the starting policy (rlkit.algorithms.dpo), or sampled
    round after round (`pairs: online`, this module's `train`)."""
    (train if ctx.stage.pairs == "online" else dpo.train)(ctx)
