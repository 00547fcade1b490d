"""Every stage's data, read, checked, rendered and length-checked before anything heavy starts.

- The held-out problems come from the recipe's `data` section: `data.eval_source`, or the first `data.num_eval`
  of its shuffled source (synthetic data has its own disjoint split).
- A stage trains on its own data (`stages.N.data` over the recipe's): the recipe's training split when it reads
  the recipe's source, else its whole source (shuffled, its first `num_train`).
- What a stage needs: prompts with gold answers for the stages that sample (grpo, ppo, rft, distill, dpo with
  policy or online pairs, reward_model with policy pairs), SFT examples for sft, preference pairs for dpo and
  reward_model with `pairs: dataset`, stepwise examples for a reward_model with data.format stepwise. A reward_model
  stage's dataset also gives its held-out pairs (or steps): its data's eval_source, else its first num_eval rows.
- Lengths: a prompt longer than `data.max_prompt_tokens` or than `model.max_seq_len - rollout.max_new_tokens` (with
  an `env`: `- rollout.episode_tokens`, a whole episode) is dropped; an SFT/DPO sequence longer than
  `model.max_seq_len` is dropped or truncated (`data.truncation`). Both are counted, logged as `data/*`, and
  reported in one warning line per stage.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace

from rlkit.data.chat import Example, Pair, Renderer, StepExample
from rlkit.recipe import DataConfig, RecipeConfig, RecipeError, looks_local
from rlkit.data.tasks import Preference, Problem, Stepwise, synthetic_splits
from rlkit.recipe.stage_kinds import STAGE_KINDS
from rlkit.data.sources import read_rows, to_records

log = logging.getLogger(__name__)

SAMPLING_KINDS = ("grpo", "ppo", "rft", "distill")
RENDERING = ("chat_template", "system_prompt", "prompt_template", "max_prompt_tokens", "truncation")


@dataclass
class StageData:
    """What one stage trains on, rendered to token ids."""

    renderer: Renderer
    source: str = ""  # where the examples came from, and their format (for the run's data.json)
    format: str = ""
    problems: list[Problem] = field(default_factory=list)  # prompts (with prompt_ids) and gold answers
    examples: list[Example] = field(default_factory=list)  # SFT: (ids, loss mask)
    pairs: list[Pair] = field(default_factory=list)  # DPO from a preference dataset
    margins: list[float] = field(default_factory=list)  # each pair's `margin` (reward_model)
    steps: list[StepExample] = field(default_factory=list)  # a process reward model's examples
    held_out: "StageData | None" = None  # a reward_model stage's held-out pairs or steps
    stats: dict[str, float] = field(default_factory=dict)  # logged as data/<key> when the stage starts


@dataclass(frozen=True)
class EvalSet:
    """A further held-out set (the recipe's `evals`), rendered with its own data section."""

    name: str
    problems: list[Problem]
    max_new_tokens: int | None  # None: rollout.max_new_tokens


@dataclass
class RunData:
    held_out: list[Problem]  # rendered with the recipe's data section
    renderer: Renderer  # the recipe's (evaluation's)
    stages: list[StageData | None]  # None for stages that train on nothing (average)
    evals: list[EvalSet] = field(default_factory=list)


def needs(cfg: RecipeConfig, index: int) -> str:
    """What stage `index` trains on: "problems", "examples", "pairs" or "" (nothing); its kind's record says."""
    return STAGE_KINDS[cfg.stages[index].kind].data(cfg.stages[index])


class _Rows:
    """Rows of each (source, subset, split), read once per run."""

    def __init__(self) -> None:
        self.cache: dict[tuple, list[dict]] = {}

    def get(self, source: str, subset: str, split: str, where: str) -> list[dict]:
        key = (source, subset, split)
        if key not in self.cache:
            self.cache[key] = read_rows(source, subset, split, where)
        return self.cache[key]


def describe(data: RunData) -> dict:
    """What the run trains and evaluates on, as the model sees it: per stage the source, format, counts, and the
    first example rendered (`text`) with the tokens it trains on (`trained`). Written to RUN_DIR/data.json."""
    def first(stage: StageData) -> dict:
        r = stage.renderer
        if stage.examples:
            ids, mask = stage.examples[0]
            return {"text": r.text(ids), "trained": r.text([t for t, m in zip(ids, mask) if m])}
        if stage.pairs:
            prompt, chosen, rejected = stage.pairs[0]
            return {"text": r.text(prompt), "chosen": r.text(chosen), "rejected": r.text(rejected)}
        if stage.steps:
            ids, ends, labels = stage.steps[0]
            return {"text": r.text(ids), "labels": labels}
        return {"text": r.text(stage.problems[0].prompt_ids), "answer": stage.problems[0].answer}

    held = data.held_out[0]
    return {
        "held_out": {"count": len(data.held_out), "text": data.renderer.text(held.prompt_ids), "answer": held.answer,
                     "chat_template": data.renderer.chat},
        "stages": [None if s is None else {"source": s.source, "format": s.format, "chat_template": s.renderer.chat,
                                           **s.stats, "first": first(s)} for s in data.stages],
        "evals": {e.name: {"count": len(e.problems), "text": data.renderer.text(e.problems[0].prompt_ids),
                           "answer": e.problems[0].answer} for e in data.evals},
    }


def _order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def recipe_splits(data: DataConfig, rows: _Rows) -> tuple[str, list, list[Problem], list[int]]:
    """(format, training records, held-out problems, training row indices) of the recipe's data section."""
    if data.source == "synthetic":
        train, held = synthetic_splits(data)
        if data.eval_source:
            held = _held_out_file(data, rows)
        return "synthetic", train, held, []
    source_rows = rows.get(data.source, data.subset, data.split, "data.source")
    order = _order(len(source_rows), data.seed)
    if data.eval_source:
        held, train_idx = _held_out_file(data, rows), order
    else:
        if len(source_rows) <= data.num_eval:
            raise RecipeError(f"data.num_eval: {data.num_eval} held-out problems requested but '{data.source}' has "
                              f"only {len(source_rows)} rows; lower it or set data.eval_source")
        _, held = to_records(source_rows, order[: data.num_eval], data, "data.source", data.source)
        _check_held_out(held, "data.source", data)
        train_idx = order[data.num_eval:]
    fmt, train = to_records(source_rows, train_idx[: data.num_train], data, "data.source", data.source)
    return fmt, train, held, train_idx


def _held_out_file(data: DataConfig, rows: _Rows, where: str = "data") -> list[Problem]:
    eval_rows = rows.get(data.eval_source, "" if looks_local(data.eval_source) else data.subset, data.eval_split,
                         f"{where}.eval_source")
    _, held = to_records(eval_rows, list(range(min(data.num_eval, len(eval_rows)))), data, f"{where}.eval_source",
                         data.eval_source)
    _check_held_out(held, f"{where}.eval_source", data)
    return held


def _check_held_out(held: list, where: str, data: DataConfig) -> None:
    for i, p in enumerate(held):
        if not isinstance(p, Problem) or not p.answer:
            what = "has no gold answer" if isinstance(p, Problem) else f"is a {type(p).__name__.lower()}"
            raise RecipeError(
                f"{where}: held-out evaluation needs prompts with gold answers, and problem {i + 1} {what}; point "
                f"data.source (or data.eval_source) at prompts with a '{data.answer_key}' column (data.answer_key) "
                "and give SFT/DPO stages their own data (stages.N.data)")


def same_reading(a: DataConfig, b: DataConfig) -> bool:
    """Whether two data sections read the same examples (they may render them differently)."""
    return replace(a, **{k: getattr(b, k) for k in RENDERING}) == b


def stage_records(cfg: RecipeConfig, index: int, rows: _Rows, recipe: tuple[str, list, list[int]]
                  ) -> tuple[str, list]:
    """(format, records) a stage trains on; `recipe` is the recipe's (format, training records, row indices)."""
    data, where = cfg.stage_data(index), f"stages.{index}.data" if cfg.stages[index].data else "data"
    recipe_fmt, recipe_train, recipe_idx = recipe
    if same_reading(cfg.data, data):
        return recipe_fmt, recipe_train
    if data.source == "synthetic":
        return "synthetic", synthetic_splits(data)[0]
    source_rows = rows.get(data.source, data.subset, data.split, f"{where}.source")
    same_source = (data.source, data.subset, data.split) == (cfg.data.source, cfg.data.subset, cfg.data.split)
    # never train on the recipe's held-out rows, whatever the stage's other settings
    indices = recipe_idx if same_source and not cfg.data.eval_source else _order(len(source_rows), data.seed)
    return to_records(source_rows, indices[: data.num_train], data, f"{where}.source", data.source)


def prepare_stage(cfg: RecipeConfig, index: int, fmt: str, records: list, renderer: Renderer) -> StageData:
    """Render one stage's records into what it trains on, enforcing the length limits."""
    stage, data = cfg.stages[index], cfg.stage_data(index)
    where = f"stages.{index}.data" if stage.data else "data"
    want, kinds = needs(cfg, index), {type(r) for r in records}
    out = StageData(renderer, data.source, fmt)
    if want == "pairs":
        if kinds != {Preference}:
            raise RecipeError(f"stages.{index}: pairs=dataset needs a preference dataset (prompt/chosen/rejected); "
                              f"{where}.source '{data.source}' is not one"
                              + (" (a stepwise one trains a process reward model: set its data.format: stepwise)"
                                 if kinds == {Stepwise} else ""))
        pairs = [renderer.pair(r) for r in records]
        kept = [fit_pair(p, cfg.model.max_seq_len, data.truncation) for p in pairs]
        out.margins = [r.margin for r, k in zip(records, kept) if k is not None]
        out.pairs, out.stats = fit_pairs(pairs, cfg.model.max_seq_len, data.truncation)
    elif want == "steps":
        if kinds != {Stepwise}:
            raise RecipeError(f"stages.{index}: data.format stepwise needs TRL's stepwise supervision (prompt, "
                              f"completions: a list of steps, labels: one true/false per step); {where}.source "
                              f"'{data.source}' is not one")
        examples = [renderer.stepwise(r, data.step_separator) for r in records]
        out.steps = [e for e in examples if len(e[0]) <= cfg.model.max_seq_len]
        out.stats = {"rows": len(examples), "kept": len(out.steps), "dropped_long": len(examples) - len(out.steps)}
    elif want == "examples":
        if Preference in kinds:
            raise RecipeError(f"stages.{index}: an sft stage cannot train on a preference dataset; use kind dpo "
                              f"with pairs: dataset, or give the stage {where}.source with prompts/completions/messages")
        missing = [i for i, r in enumerate(records) if isinstance(r, Problem) and not r.solution]
        if missing:
            raise RecipeError(f"{where}: SFT needs a target; example {missing[0] + 1} has no completion, "
                              f"'{data.solution_key}' or '{data.answer_key}'")
        out.examples, out.stats = fit_examples([renderer.example(r) for r in records], cfg.model.max_seq_len,
                                               data.truncation)
    elif want == "problems":
        if kinds != {Problem} or any(not r.answer for r in records):
            raise RecipeError(
                f"stages.{index}: a {stage.kind} stage samples answers and scores them against a gold answer; "
                f"{where}.source '{data.source}' needs prompts with a '{data.answer_key}' column "
                f"(set {where}.answer_key, or give the stage its own data)"
                + ("; a reward model trains on a preference dataset with pairs: dataset" if stage.kind == "reward_model"
                   else ""))
        out.problems, out.stats = fit_prompts(records, renderer, prompt_limit(cfg, data))
    return out


def prompt_limit(cfg: RecipeConfig, data: DataConfig, new_tokens: int = 0) -> int:
    """The longest prompt that leaves room for a whole completion (`new_tokens`, else rollout.max_new_tokens, or a
    whole episode's rollout.episode_tokens with an environment) in the context (and within max_prompt_tokens)."""
    episode = cfg.rollout.episode_tokens if cfg.env.enabled else cfg.rollout.max_new_tokens
    room = cfg.model.max_seq_len - (new_tokens or episode)
    return min(room, data.max_prompt_tokens) if data.max_prompt_tokens else room


def fit_prompts(problems: list[Problem], renderer: Renderer, limit: int) -> tuple[list[Problem], dict[str, float]]:
    """Problems with their rendered prompt ids; those longer than `limit` tokens are dropped."""
    rendered = [replace(p, prompt_ids=tuple(renderer.prompt_ids(p))) for p in problems]
    kept = [p for p in rendered if len(p.prompt_ids) <= limit]
    return kept, {"rows": len(problems), "kept": len(kept), "dropped_long": len(problems) - len(kept)}


def fit_examples(examples: list[Example], max_len: int, truncation: str) -> tuple[list[Example], dict[str, float]]:
    """SFT examples within `max_len` tokens: longer ones dropped, or cut from the left (keeping the end) or the
    right; an example left with no trained token is dropped.

    >>> fit_examples([([1, 2, 3], [0, 1, 1]), ([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])], 4, "truncate_right")
    ([([1, 2, 3], [0, 1, 1]), ([1, 2, 3, 4], [0, 0, 1, 1])], {'rows': 2, 'kept': 2, 'dropped_long': 0, 'truncated': 1})
    >>> fit_examples([([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])], 4, "drop")[1]["dropped_long"]
    1
    """
    kept, dropped, truncated = [], 0, 0
    for ids, mask in examples:
        if len(ids) > max_len:
            if truncation == "drop":
                dropped += 1
                continue
            cut = slice(len(ids) - max_len, None) if truncation == "truncate_left" else slice(0, max_len)
            ids, mask = ids[cut], mask[cut]
            if not any(mask[1:]):  # the first token is never a target
                dropped += 1
                continue
            truncated += 1
        kept.append((ids, mask))
    return kept, {"rows": len(examples), "kept": len(kept), "dropped_long": dropped, "truncated": truncated}


def fit_pair(pair: Pair, max_len: int, truncation: str) -> Pair | None:
    """One pair as `fit_pairs` keeps it (None: dropped)."""
    kept, _ = fit_pairs([pair], max_len, truncation)
    return kept[0] if kept else None


def fit_pairs(pairs: list[Pair], max_len: int, truncation: str) -> tuple[list[Pair], dict[str, float]]:
    """Preference pairs whose prompt + longer reply fits `max_len`: others dropped, or the prompt cut from the
    left (TRL's keep_end), or both replies cut from the right.

    >>> fit_pairs([([1, 2, 3], [4, 5], [6])], 4, "truncate_left")[0]
    [([2, 3], [4, 5], [6])]
    >>> fit_pairs([([1, 2, 3], [4, 5], [6])], 4, "truncate_right")[0]
    [([1, 2, 3], [4], [6])]
    """
    kept, dropped, truncated = [], 0, 0
    for prompt, chosen, rejected in pairs:
        over = len(prompt) + max(len(chosen), len(rejected)) - max_len
        if over > 0:
            if truncation == "truncate_left" and over < len(prompt):
                prompt = prompt[over:]
            elif truncation == "truncate_right" and len(prompt) < max_len:
                chosen, rejected = chosen[: max_len - len(prompt)], rejected[: max_len - len(prompt)]
            else:
                dropped += 1
                continue
            truncated += 1
        kept.append((prompt, chosen, rejected))
    return kept, {"rows": len(pairs), "kept": len(kept), "dropped_long": dropped, "truncated": truncated}


def prepare_run_data(cfg: RecipeConfig, tokenizer, stop_ids: list[int] = ()) -> RunData:
    """Read and render every stage's data and the held-out set; bad data fails here with one clear line."""
    rows = _Rows()
    renderer = Renderer(tokenizer, cfg.data, stop_ids)
    fmt, train, held, train_idx = recipe_splits(cfg.data, rows)
    held, held_stats = fit_prompts(held, renderer, prompt_limit(cfg, cfg.data))
    _report("held-out", held_stats, cfg.data)
    if not held:
        raise RecipeError("data: every held-out prompt is longer than the prompt limit; raise model.max_seq_len "
                          "or data.max_prompt_tokens")
    stages: list[StageData | None] = []
    for index, stage in enumerate(cfg.stages):
        if not needs(cfg, index):
            stages.append(None)
            continue
        stage_fmt, records = stage_records(cfg, index, rows, (fmt, train, train_idx))
        stage_renderer = renderer if not stage.data else Renderer(tokenizer, cfg.stage_data(index), stop_ids)
        held_out = None
        if stage.kind == "reward_model" and needs(cfg, index) != "problems":
            records, held_records = reward_model_split(cfg, index, records, rows)
            held_out = prepare_stage(cfg, index, stage_fmt, held_records, stage_renderer)
            if not (held_out.pairs or held_out.steps):
                raise RecipeError(f"stages.{index}: no held-out example is left after the length limits "
                                  f"(model.max_seq_len={cfg.model.max_seq_len}); raise it, or set data.truncation")
        prepared = prepare_stage(cfg, index, stage_fmt, records, stage_renderer)
        prepared.held_out = held_out
        _report(f"stage {index} ({stage.kind})", prepared.stats, cfg.stage_data(index))
        if not (prepared.problems or prepared.examples or prepared.pairs or prepared.steps):
            raise RecipeError(f"stages.{index}: no example is left after the length limits (model.max_seq_len="
                              f"{cfg.model.max_seq_len}); raise it, or set data.truncation")
        stages.append(prepared)
    return RunData(held, renderer, stages, prepare_eval_sets(cfg, tokenizer, stop_ids, rows))


def reward_model_split(cfg: RecipeConfig, index: int, records: list, rows: _Rows) -> tuple[list, list]:
    """(training, held-out) records of a reward_model stage's dataset: the held-out ones from its data's eval_source
    (its first num_eval rows), else the first num_eval of its own shuffled rows, which it then does not train on."""
    data, where = cfg.stage_data(index), f"stages.{index}.data"
    if data.eval_source:
        eval_rows = rows.get(data.eval_source, "" if looks_local(data.eval_source) else data.subset, data.eval_split,
                             f"{where}.eval_source")
        _, held = to_records(eval_rows, list(range(min(data.num_eval, len(eval_rows)))), data, f"{where}.eval_source",
                             data.eval_source)
        return records, held
    if len(records) <= data.num_eval:
        raise RecipeError(f"{where}.num_eval: a reward_model stage holds out {data.num_eval} of its "
                          f"{len(records)} examples to measure pairwise accuracy, leaving none to train on; lower it "
                          "or give the stage an eval_source")
    return records[data.num_eval:], records[: data.num_eval]


def prepare_eval_sets(cfg: RecipeConfig, tokenizer, stop_ids: list[int], rows: _Rows) -> list[EvalSet]:
    """The recipe's further held-out sets, each rendered with its data section, prompts that leave no room for
    its answers dropped (and reported)."""
    sets = []
    for i, spec in enumerate(cfg.evals):
        data, where = cfg.eval_data(i), f"evals.{i}.data"
        limit = prompt_limit(cfg, data, spec.max_new_tokens)
        problems, stats = fit_prompts(_held_out_file(data, rows, where), Renderer(tokenizer, data, stop_ids), limit)
        _report(f"eval set {spec.name}", stats, data)
        if not problems:
            raise RecipeError(f"{where}: every prompt of eval set '{spec.name}' is longer than {limit} tokens; raise "
                              "model.max_seq_len or lower its max_new_tokens")
        sets.append(EvalSet(spec.name, problems, spec.max_new_tokens or None))
    return sets


def _report(what: str, stats: dict[str, float], data: DataConfig) -> None:
    dropped, truncated = stats.get("dropped_long", 0), stats.get("truncated", 0)
    if dropped or truncated:
        log.warning("%s: %d of %d examples dropped and %d truncated for length (model.max_seq_len, "
                    "data.max_prompt_tokens, data.truncation=%s)", what, dropped, stats["rows"], truncated,
                    data.truncation)
