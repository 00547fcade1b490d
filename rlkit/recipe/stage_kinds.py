"""What each stage kind is to a recipe, in one record per kind (STAGE_KINDS): the StageConfig fields of its own it
reads, the data it trains on, the rows one step trains on, whether it trains a model, whether the engines follow the
trainer after every step, whether it uses the advantage estimator, its checks (all run when the recipe loads,
rlkit.recipe.validate) and its `train`, an import path loaded only when the stage runs (so loading a recipe needs
no torch).

A stage that sets a field its kind does not read (`teacher` on a grpo stage, `pairs` on an sft stage) is refused:
a setting that would be silently ignored is a bug in the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from rlkit.recipe.config import RecipeConfig, StageConfig
from rlkit.recipe.errors import RecipeError
from rlkit.recipe.names import load_object

# StageConfig fields every kind reads (an average stage ignores steps and batch_size: it trains nothing)
COMMON_FIELDS = ("kind", "name", "steps", "batch_size", "lr", "warmup_steps", "save_every", "data", "start")
INIT = "00_init"  # the run's starting checkpoint folder


def _batch(cfg: RecipeConfig, stage: StageConfig) -> int:
    return stage.batch_size


def _one(cfg: RecipeConfig) -> int:
    return 1


def _minibatch_steps(cfg: RecipeConfig) -> int:  # grpo, ppo
    return cfg.algo.ppo_epochs * cfg.algo.ppo_minibatches


def _problems(stage: StageConfig) -> str:  # the stages that sample: prompts with gold answers
    return "problems"


@dataclass(frozen=True)
class StageKind:
    # "pkg.module:function", the kind's train(ctx): it trains ctx.workers.trainer from ctx.model_path; the runner then
    # syncs the engines (unless syncs_every_step did) and saves the stage's checkpoint. A kind that trains no model
    # (trains_model False) has train(ctx, recipe_yaml) -> the checkpoint folder it wrote
    train: str
    # what it trains on, given its stage: "problems" (prompts with gold answers), "examples" (SFT targets), "pairs"
    # (a preference dataset) or "" (nothing); rlkit.data.prepare reads and checks it at load
    data: Callable[[StageConfig], str] = _problems
    fields: tuple[str, ...] = ()  # the StageConfig fields beyond COMMON_FIELDS that the kind reads
    # rows of one step that stay together on one trainer rank: sequences, or DPO pairs (a pair's two sequences are
    # never split)
    rows: Callable[[RecipeConfig, StageConfig], int] = _batch
    trains_model: bool = True  # False: no trainer group is made (average: a checkpoint from earlier ones)
    # False: its checkpoint is not the policy (reward_model: a reward model); the next stage starts from the policy
    # this one started from, which is not evaluated again
    yields_policy: bool = True
    syncs_every_step: bool = False  # the engines take the weights after every step (else once, at the stage's end)
    uses_advantage_estimator: bool = False  # algo.advantage_estimator is resolved before the run starts
    # it climbs the rewards step by step (GRPO, PPO): what reward.stop_on_gold_drop watches for over-optimisation
    optimises_reward: bool = False
    updates_per_step: Callable[[RecipeConfig], int] = _one  # optimizer steps of one stage step
    check: Optional[Callable[[RecipeConfig, int], None]] = None  # the kind's own checks of stages.<i>

    def load_train(self) -> Callable:
        """The kind's train function, imported now (torch and the algorithm's modules load here, not at recipe load)."""
        return load_object(self.train, "stage kind train")


def checkpoint_name(stage: StageConfig, index: int) -> str:
    """The stage's checkpoint folder under RUN_DIR/checkpoints: its name, or `<index + 1>_<kind>`."""
    return stage.name or f"{index + 1:02d}_{stage.kind}"


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RecipeError(f"{name}: '{value}' is not one of {', '.join(allowed)}")


def _check_dpo(cfg: RecipeConfig, i: int) -> None:
    stage = cfg.stages[i]
    one_of(f"stages.{i}.pairs", stage.pairs, ("policy", "online", "dataset"))
    if stage.pairs == "online" and (stage.samples < 2 or stage.steps < stage.rounds):
        raise RecipeError(f"stages.{i}: online DPO needs samples >= 2 and at least one step per round "
                          f"(steps={stage.steps}, rounds={stage.rounds})")
    if cfg.trainer.micro_batch_size % 2:
        raise RecipeError("trainer.micro_batch_size: DPO keeps each pair in one micro-batch, so it must be even")
    if cfg.env.enabled and stage.pairs != "dataset":
        raise RecipeError(f"env: multi-turn episodes train GRPO, PPO, RFT and distill stages; stages.{i} would pair "
                          "whole episodes for DPO with the environment's tokens in them. Use pairs: dataset, or run "
                          "it in a recipe without env")


def _check_sampling(cfg: RecipeConfig, i: int) -> None:  # rft (and distill)
    one_of(f"stages.{i}.keep", cfg.stages[i].keep, ("best", "all"))


def _is_checkpoint_folder(path: str) -> bool:
    """Whether `path` is a local Hugging Face checkpoint folder (its config.json is there)."""
    return bool(path) and (Path(path) / "config.json").is_file()


def _check_distill(cfg: RecipeConfig, i: int) -> None:
    _check_sampling(cfg, i)
    teacher = cfg.stages[i].teacher
    if not _is_checkpoint_folder(teacher):
        raise RecipeError(f"stages.{i}.teacher: '{teacher}' is not a Hugging Face checkpoint folder "
                          "(config.json, weights, tokenizer); give the teacher model's local path")


def _check_minibatches(cfg: RecipeConfig, i: int) -> None:  # ppo (and grpo)
    rows = STAGE_KINDS[cfg.stages[i].kind].rows(cfg, cfg.stages[i])
    ranks, minibatches = cfg.cluster.trainer_ranks, cfg.algo.ppo_minibatches
    if rows % (minibatches * ranks):
        raise RecipeError(f"algo.ppo_minibatches: {rows} rows per step of stages.{i} do not split into {minibatches} "
                          f"minibatches x cluster.trainer_ranks={ranks}; choose a divisor of the rows")


def _check_grpo(cfg: RecipeConfig, i: int) -> None:
    if cfg.algo.group_size < 2:
        raise RecipeError(f"algo.group_size: GRPO needs at least 2 samples per prompt, got {cfg.algo.group_size}")
    _check_minibatches(cfg, i)


def average_source(stages: list[StageConfig], i: int) -> str | None:
    """The checkpoint folder average stage `i` averages: the earlier stage its `source` names (by name or
    checkpoint folder), else the previous stage's; None when there is no such stage."""
    earlier = [(checkpoint_name(s, j), s.name) for j, s in enumerate(stages[:i])]
    source = stages[i].source
    if not source:
        return earlier[-1][0] if earlier else None
    return next((folder for folder, name in earlier if source in (folder, name)), None)


def earlier_policy(stages: list[StageConfig], i: int, name: str) -> str | None:
    """The checkpoint folder of the policy `name` names for stage `i`: an earlier stage that trains the policy (by its
    name or checkpoint folder), or the run's start (00_init); None when it names none."""
    if name == INIT:
        return INIT
    if not name:
        return None
    return next((checkpoint_name(s, j) for j, s in enumerate(stages[:i])
                 if STAGE_KINDS[s.kind].yields_policy and name in (s.name, checkpoint_name(s, j))), None)


def _check_policy_name(stages: list[StageConfig], i: int, field: str, name: str) -> None:
    if earlier_policy(stages, i, name) is None:
        names = [INIT] + [checkpoint_name(s, j) for j, s in enumerate(stages[:i]) if STAGE_KINDS[s.kind].yields_policy]
        raise RecipeError(f"stages.{i}.{field}: '{name}' is not an earlier stage's policy; expected one of {names} "
                          "(or that stage's name)")


def unknown_source_error(stages: list[StageConfig], i: int) -> RecipeError:
    earlier = [checkpoint_name(s, j) for j, s in enumerate(stages[:i])]
    return RecipeError(f"stages.{i}.source: '{stages[i].source}' is not an earlier stage; expected one of {earlier}")


def _check_reward_model(cfg: RecipeConfig, i: int) -> None:
    stage, data = cfg.stages[i], cfg.stage_data(i)
    one_of(f"stages.{i}.pairs", stage.pairs, ("dataset", "policy"))
    if data.format == "stepwise" and stage.pairs != "dataset":
        raise RecipeError(f"stages.{i}.pairs: a process reward model (data.format stepwise) trains on a stepwise "
                          "dataset; set pairs: dataset")
    if stage.pairs == "policy" and stage.samples < 2:
        raise RecipeError(f"stages.{i}.samples: pairs: policy pairs a correct sample with a wrong one of the same "
                          f"prompt, so it needs samples >= 2, got {stage.samples}")
    if stage.save_every:
        raise RecipeError(f"stages.{i}.save_every: snapshots are policy checkpoints for an average stage; a "
                          "reward_model stage keeps only its final checkpoint, remove it")
    if data.format != "stepwise" and cfg.trainer.micro_batch_size % 2:
        raise RecipeError("trainer.micro_batch_size: a reward model keeps each pair in one micro-batch, so it must "
                          "be even")
    if cfg.algo.rm_center_coef < 0:
        raise RecipeError(f"algo.rm_center_coef: must be >= 0, got {cfg.algo.rm_center_coef}")
    if stage.model and earlier_policy(cfg.stages, i, stage.model) is None and not _is_checkpoint_folder(stage.model):
        raise RecipeError(f"stages.{i}.model: '{stage.model}' is neither an earlier stage's policy nor a Hugging Face "
                          "checkpoint folder (config.json, weights, tokenizer); name the stage, or give a local path")


def _reward_model_data(stage: StageConfig) -> str:
    if stage.pairs != "dataset":
        return "problems"  # prompts to sample pairs from
    return "steps" if stage.data.get("format") == "stepwise" else "pairs"


def _check_average(cfg: RecipeConfig, i: int) -> None:
    stage = cfg.stages[i]
    one_of(f"stages.{i}.method", stage.method, ("uniform", "ema"))
    if not 0.0 < stage.ema_decay < 1.0:
        raise RecipeError(f"stages.{i}.ema_decay: must be in (0, 1), got {stage.ema_decay}")
    if i == 0 and not stage.source:
        raise RecipeError(f"stages.{i}: an average stage needs an earlier stage (with save_every) to average")
    if stage.start:
        raise RecipeError(f"stages.{i}.start: an average stage averages the snapshots of `source`, it starts from no "
                          "policy; remove it")
    if average_source(cfg.stages, i) is None:
        raise unknown_source_error(cfg.stages, i)


STAGE_KINDS = {
    "sft": StageKind("rlkit.algorithms.sft:train", data=lambda stage: "examples"),
    "dpo": StageKind("rlkit.algorithms.online_dpo:train_dpo", fields=("pairs", "rounds", "samples"), check=_check_dpo,
                     data=lambda stage: "pairs" if stage.pairs == "dataset" else "problems"),
    "grpo": StageKind("rlkit.algorithms.grpo:train", rows=lambda cfg, stage: stage.batch_size * cfg.algo.group_size,
                      syncs_every_step=True, uses_advantage_estimator=True, updates_per_step=_minibatch_steps,
                      optimises_reward=True, check=_check_grpo),
    "ppo": StageKind("rlkit.algorithms.ppo:train", syncs_every_step=True, updates_per_step=_minibatch_steps,
                     optimises_reward=True, check=_check_minibatches),
    "rft": StageKind("rlkit.algorithms.rft:train", fields=("samples", "keep"), check=_check_sampling),
    "distill": StageKind("rlkit.algorithms.rft:train", fields=("samples", "keep", "teacher"), check=_check_distill),
    "average": StageKind("rlkit.algorithms.average:run", data=lambda stage: "", trains_model=False,
                         fields=("source", "last", "method", "ema_decay"), check=_check_average),
    "reward_model": StageKind("rlkit.algorithms.reward_model:train", data=_reward_model_data, trains_model=False,
                              yields_policy=False, fields=("pairs", "samples", "model"), check=_check_reward_model),
}


def reward_model_stage(stages: list[StageConfig], path: str) -> int | None:
    """The index of the reward_model stage whose output `path` names (its `name` or checkpoint folder); None when it
    names none (a folder)."""
    for j, s in enumerate(stages):
        if s.kind == "reward_model" and path in (s.name, checkpoint_name(s, j)):
            return j
    return None


def check_stage(cfg: RecipeConfig, i: int) -> None:
    """stages.<i>: a known kind, the fields it sets are its kind's, its rows split over the trainer ranks, and its
    kind's own checks."""
    stage = cfg.stages[i]
    one_of(f"stages.{i}.kind", stage.kind, tuple(STAGE_KINDS))
    kind = STAGE_KINDS[stage.kind]
    default = type(stage)(kind=stage.kind)  # StageConfig's defaults
    for f in fields(stage):
        if f.name not in COMMON_FIELDS + kind.fields and getattr(stage, f.name) != getattr(default, f.name):
            readers = [k for k, v in STAGE_KINDS.items() if f.name in v.fields]
            raise RecipeError(f"stages.{i}.{f.name}: {stage.kind} stages do not read it (only "
                              f"{', '.join(readers)} stages do); remove it")
    if stage.steps < 0:
        raise RecipeError(f"stages.{i}.steps: must be >= 0, got {stage.steps}")
    if stage.batch_size <= 0:
        raise RecipeError(f"stages.{i}.batch_size: must be > 0, got {stage.batch_size}")
    if stage.save_every < 0 or stage.samples < 1 or stage.rounds < 1 or stage.last < 1:
        raise RecipeError(f"stages.{i}: save_every must be >= 0, and samples, rounds and last >= 1")
    rows, ranks = kind.rows(cfg, stage), cfg.cluster.trainer_ranks
    if rows % ranks:
        raise RecipeError(f"stages.{i}.batch_size: {rows} rows per step do not split evenly over "
                          f"cluster.trainer_ranks={ranks}")
    if stage.start:
        _check_policy_name(cfg.stages, i, "start", stage.start)
    if kind.check is not None:
        kind.check(cfg, i)


def stage_updates(cfg: RecipeConfig, index: int) -> int:
    """Optimizer steps stage `index` takes (where trainer.lr_schedule decays to 0): its steps, times the optimizer
    steps of each (GRPO and PPO: ppo_epochs x ppo_minibatches; a target_kl early stop takes fewer)."""
    stage = cfg.stages[index]
    return stage.steps * STAGE_KINDS[stage.kind].updates_per_step(cfg)
