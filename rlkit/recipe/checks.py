"""The checks a recipe passes when it loads, all before anything runs: each numeric field in its range, each named
switch one of its names, each stage its kind's (rlkit.recipe.stage_kinds), and the rules that span sections. Each
failure is one RecipeError naming the field and the fix."""

from __future__ import annotations

import math
import re
from pathlib import Path

from rlkit.recipe import names
from rlkit.recipe.config import (DATA_FORMATS, EVAL_SET_NAME, MAX_ENGINE_LORA_RANK, PLACEMENTS, RESERVED_EVAL_NAMES,
                                 RUNTIME_ENV_KEYS, WEIGHT_TRANSFERS, DataConfig, RecipeConfig)
from rlkit.recipe.engine_args import check_engine_kwargs
from rlkit.recipe.errors import RecipeError
from rlkit.recipe.names import check_switch, looks_local
from rlkit.recipe.stage_kinds import STAGE_KINDS, check_stage, checkpoint_name, one_of as _one_of, reward_model_stage


# The range of every numeric field a user sets (the data section's are in check_data, a stage's in validate).
NUMERIC_RANGES = {
    "> 0": ["model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads", "model.max_seq_len",
            "rollout.max_new_tokens", "rollout.kv_cache_gib", "rollout.sync_timeout_s", "rollout.sync_bucket_mb", "trainer.lr",
            "trainer.grad_clip", "trainer.micro_batch_size", "trainer.lora_alpha", "algo.group_size",
            "algo.epsilon_high", "algo.ppo_epochs", "algo.ppo_minibatches", "algo.dpo_beta", "algo.value_clip",
            "cluster.rollout_engines", "rollout.tensor_parallel_size", "rollout.max_num_seqs",
            "cluster.trainer_ranks", "reward.num_workers", "reward.timeout_s", "logging.log_every",
            "cluster.placement_timeout_s", "cluster.scorer_actors"],
    ">= 0": ["rollout.temperature", "ref.kl_coef", "trainer.weight_decay", "trainer.warmup_steps",
             "trainer.num_threads", "trainer.lora_rank", "trainer.micro_batch_tokens", "algo.tis_cap",
             "algo.overlong_buffer", "algo.overlong_penalty", "algo.dpo_nll_coef",
             "algo.entropy_coef", "algo.target_kl", "rollout.max_staleness",
             "logging.eval_temperature", "logging.eval_sample_temperature", "cluster.cpus_per_trainer",
             "cluster.gpus_per_trainer", "cluster.cpus_per_engine", "cluster.gpus_per_engine", "checkpoint.every",
             "rollout.gpu_kv_cache_gib"],
    "in (0, 1]": ["rollout.top_p", "rollout.gpu_memory_utilization"],
    "in (0, 1)": ["algo.epsilon"],
    "in [0, 1]": ["algo.gamma", "algo.gae_lambda", "reward.max_error_rate"],
}


_IN_RANGE = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in (0, 1]": lambda v: 0 < v <= 1,
             "in (0, 1)": lambda v: 0 < v < 1, "in [0, 1]": lambda v: 0 <= v <= 1}


def check_ranges(cfg: RecipeConfig) -> None:
    """Every numeric field within its range and finite (NUMERIC_RANGES), checked before any cross-field rule."""
    for rule, keys in NUMERIC_RANGES.items():
        for key in keys:
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if not (math.isfinite(value) and _IN_RANGE[rule](value)):
                raise RecipeError(f"{key}: must be {rule}, got {value}")
    for i, beta in enumerate(cfg.trainer.betas):
        if not 0 <= beta < 1:
            raise RecipeError(f"trainer.betas[{i}]: Adam's betas must be in [0, 1), got {beta}")
    for i, stage in enumerate(cfg.stages):
        if stage.lr is not None and not (math.isfinite(stage.lr) and stage.lr > 0):
            raise RecipeError(f"stages.{i}.lr: must be > 0, got {stage.lr}")
        if stage.warmup_steps is not None and stage.warmup_steps < 0:
            raise RecipeError(f"stages.{i}.warmup_steps: must be >= 0, got {stage.warmup_steps}")


def validate(cfg: RecipeConfig) -> None:
    """Checks that span fields or sections; each names the field and the fix. In this order, so a recipe with
    several faults reports the same first one whatever changes elsewhere."""
    check_ranges(cfg)
    if not cfg.stages:
        raise RecipeError("stages: the recipe has no stages; add at least one, e.g. [{kind: sft}]")
    for i in range(len(cfg.stages)):
        check_stage(cfg, i)  # its kind's fields and checks (rlkit.recipe.stage_kinds)
    check_algorithm(cfg)
    check_trainer(cfg)
    check_logging(cfg)
    _one_of("resume", cfg.resume, ("never", "auto"))
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise RecipeError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    _one_of("reward.on_error", cfg.reward.on_error, ("exclude", "score", "fail"))
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise RecipeError(
            f"model.hidden_size: {cfg.model.hidden_size} is not divisible by model.num_heads={cfg.model.num_heads}"
        )
    check_data("data", cfg.data)
    if cfg.data.format == "stepwise":
        raise RecipeError("data.format: 'stepwise' is a reward_model stage's own data (stages.N.data.format); the "
                          "recipe's data section holds the held-out problems")
    for i, stage in enumerate(cfg.stages):
        if stage.data:
            check_data(f"stages.{i}.data", cfg.stage_data(i))
    check_eval_sets(cfg)
    check_cluster(cfg)
    check_env(cfg)
    check_rewards(cfg)


def check_algorithm(cfg: RecipeConfig) -> None:
    """The engines' dtype, the named switches of ref and algo (a built-in name from rlkit.recipe.names, or an import
    path), and how they combine."""
    _one_of("rollout.dtype", cfg.rollout.dtype, ("auto", "float32", "bfloat16", "float16"))
    check_switch("ref.kl_estimator", cfg.ref.kl_estimator, names.KL_ESTIMATORS)
    _one_of("ref.kl_in", cfg.ref.kl_in, ("loss", "reward"))
    check_switch("algo.loss_agg", cfg.algo.loss_agg, names.LOSS_AGGREGATIONS)
    _one_of("algo.ratio_level", cfg.algo.ratio_level, ("token", "sequence"))
    check_switch("algo.pg_loss", cfg.algo.pg_loss, names.POLICY_LOSSES)
    if cfg.algo.ratio_level == "sequence" and (cfg.algo.loss_agg, cfg.algo.pg_loss) != ("seq-mean-token-mean", "clip"):
        raise RecipeError(
            f"algo.ratio_level: 'sequence' is GSPO, whose clipped objective averages each sequence, then the "
            f"sequences; set algo.loss_agg=seq-mean-token-mean and algo.pg_loss=clip (got {cfg.algo.loss_agg}, "
            f"{cfg.algo.pg_loss}: a sequence ratio under another aggregation is not the paper's objective)"
        )
    if cfg.algo.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise RecipeError(
            f"algo.overlong_buffer: {cfg.algo.overlong_buffer} must be below rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
        )
    if cfg.algo.resample_rounds < 1:
        raise RecipeError(f"algo.resample_rounds: must be >= 1, got {cfg.algo.resample_rounds}")
    check_switch("algo.dpo_loss", cfg.algo.dpo_loss, names.DPO_LOSSES)


def check_trainer(cfg: RecipeConfig) -> None:
    """Precision, attention, LoRA, schedule and compile settings of the trainer and the reference."""
    _one_of("trainer.dtype", cfg.trainer.dtype, ("auto", "float32", "bfloat16", "float64"))
    _one_of("trainer.attn_implementation", cfg.trainer.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2"))
    _one_of("ref.dtype", cfg.ref.dtype, ("auto", "float32", "bfloat16", "float64"))
    _one_of("ref.placement", cfg.ref.placement, ("trainer", "actor"))
    _one_of("trainer.lora_sync", cfg.trainer.lora_sync, ("merged", "adapter"))
    _one_of("trainer.lr_schedule", cfg.trainer.lr_schedule, ("constant", "linear", "cosine"))
    if cfg.trainer.lora_sync == "adapter" and not 0 < cfg.trainer.lora_rank <= MAX_ENGINE_LORA_RANK:
        raise RecipeError(f"trainer.lora_sync: 'adapter' needs trainer.lora_rank between 1 and {MAX_ENGINE_LORA_RANK} "
                          f"(vLLM's limit), got {cfg.trainer.lora_rank}")
    _one_of("trainer.logprob_impl", cfg.trainer.logprob_impl, ("auto", "torch", "triton"))
    if cfg.trainer.compile:  # Inductor builds C++ kernels on CPU (and Triton a C launcher on CUDA)
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise RecipeError("trainer.compile: torch.compile's Inductor needs a C++ compiler and none (g++, c++, "
                              "clang++) is on PATH; install one (apt-get install g++) or set trainer.compile=false")


def check_logging(cfg: RecipeConfig) -> None:
    gold = ("gold/accuracy", "gold/mean_reward") if cfg.reward.gold else ()  # the gold rewards' (reward.gold)
    _one_of("logging.best_metric", cfg.logging.best_metric, ("accuracy", "mean_reward") + gold)
    if cfg.logging.eval_every < 0 or cfg.logging.log_every < 1:
        raise RecipeError("logging.eval_every must be >= 0 and logging.log_every >= 1")
    _one_of("logging.wandb_mode", cfg.logging.wandb_mode, ("online", "offline", "disabled"))
    lg = cfg.logging
    if lg.eval_samples and not all(1 <= k <= lg.eval_samples for k in lg.eval_pass_k):
        raise RecipeError(f"logging.eval_pass_k: each k must be between 1 and logging.eval_samples "
                          f"({lg.eval_samples}), got {list(lg.eval_pass_k)}")
    if lg.eval_samples < 0 or lg.table_rows < 0 or lg.completions_every < 0:
        raise RecipeError("logging.eval_samples, logging.table_rows and logging.completions_every must be >= 0")


def check_cluster(cfg: RecipeConfig) -> None:
    """The backend, joining a cluster, placement, and asynchronous sampling's need for the decoupled objective."""
    _one_of("cluster.backend", cfg.cluster.backend, ("local", "ray"))
    if cfg.cluster.trainer_ranks > 1 and cfg.cluster.backend != "ray":
        raise RecipeError("cluster.trainer_ranks: more than one rank needs cluster.backend=ray")
    if cfg.cluster.rollout_engines > 1 and cfg.cluster.backend != "ray":
        raise RecipeError("cluster.rollout_engines: more than one engine needs cluster.backend=ray")
    if cfg.cluster.scorer_actors > 1 and cfg.cluster.backend != "ray":
        raise RecipeError("cluster.scorer_actors: more than one scorer actor needs cluster.backend=ray (in this "
                          "process, raise reward.num_workers instead)")
    _one_of("cluster.placement", cfg.cluster.placement, PLACEMENTS)
    for key, value in (("address", cfg.cluster.address), ("runtime_env", cfg.cluster.runtime_env)):
        if value and cfg.cluster.backend != "ray":
            raise RecipeError(f"cluster.{key}: only a Ray run joins a cluster or takes a runtime_env; set "
                              "cluster.backend=ray or remove it")
    unknown = sorted(set(cfg.cluster.runtime_env) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise RecipeError(f"cluster.runtime_env: unknown key '{unknown[0]}'; rlkit passes on "
                          f"{', '.join(RUNTIME_ENV_KEYS)}")
    check_engines(cfg)
    check_weight_transfer(cfg)
    if cfg.rollout.max_staleness and not cfg.algo.tis_cap:
        raise RecipeError(
            f"rollout.max_staleness: {cfg.rollout.max_staleness} trains on samples from older weights, which the "
            "decoupled objective corrects with truncated importance weights; set algo.tis_cap (e.g. 2.0)"
        )


def check_engines(cfg: RecipeConfig) -> None:
    """An engine's GPUs are its tensor-parallel workers, one each; its further vLLM arguments are vLLM's own."""
    tp, gpus = cfg.rollout.tensor_parallel_size, cfg.cluster.gpus_per_engine
    if (tp > 1 or gpus > 1) and gpus != tp:
        raise RecipeError(f"cluster.gpus_per_engine: {gpus:g} GPUs for an engine of rollout.tensor_parallel_size={tp}, "
                          f"which runs one worker per GPU; set cluster.gpus_per_engine={tp}")
    check_engine_kwargs(cfg.rollout.engine_kwargs)


def check_weight_transfer(cfg: RecipeConfig) -> None:
    """rollout.weight_transfer names a transport the run's devices have (GPUs are known here only on Ray)."""
    c, transport = cfg.cluster, cfg.rollout.weight_transfer
    _one_of("rollout.weight_transfer", transport, WEIGHT_TRANSFERS)
    if transport == "nccl" and c.backend == "ray" and not (c.gpus_per_engine and c.gpus_per_trainer):
        raise RecipeError("rollout.weight_transfer: 'nccl' needs GPUs on the trainer and the engines "
                          "(cluster.gpus_per_trainer, cluster.gpus_per_engine); use 'gloo' (or 'auto') on CPUs")
    if transport == "ipc" and c.backend != "local":
        raise RecipeError("rollout.weight_transfer: 'ipc' shares one GPU between the trainer and its engine, which "
                          "only cluster.backend=local does; use 'nccl' (or 'auto') on Ray")


def check_rewards(cfg: RecipeConfig) -> None:
    if not cfg.reward.rewards:
        raise RecipeError("reward.rewards: empty; name at least one reward, e.g. [{name: math}]")
    for i, spec in enumerate(cfg.reward.rewards):
        if not spec.name and not spec.import_path:
            raise RecipeError(f"reward.rewards[{i}]: give a built-in name (e.g. math) or an import_path 'pkg.mod:Class'")
        check_model_reward(cfg, i)
    if all(s.path and reward_model_stage(cfg.stages, s.path) is not None for s in cfg.reward.rewards):
        raise RecipeError("reward.rewards: every reward is a reward model a stage trains later, so nothing scores "
                          "the held-out answers before it; add a verifier first, e.g. {name: math, weight: 0} "
                          "(the first reward's verdict is held-out accuracy)")
    if cfg.reward.timeout_s <= 0 or cfg.reward.num_workers < 1:
        raise RecipeError("reward.timeout_s must be > 0 and reward.num_workers >= 1")
    check_gold(cfg)


def check_gold(cfg: RecipeConfig) -> None:
    """The gold rewards (monitored, never trained on) and the early stop that watches them."""
    reward = cfg.reward
    for i, spec in enumerate(reward.gold):
        if not spec.name and not spec.import_path:
            raise RecipeError(f"reward.gold[{i}]: give a built-in name (e.g. math) or an import_path 'pkg.mod:Class'")
        if spec.path and (spec.name != "model" or spec.import_path):
            raise RecipeError(f"reward.gold[{i}].path: only a reward with name: model reads it; remove it")
        if spec.path and reward_model_stage(cfg.stages, spec.path) is not None:
            raise RecipeError(f"reward.gold[{i}].path: a gold reward scores the whole run, so it cannot be the model "
                              f"a reward_model stage of this recipe trains ('{spec.path}'); give a trained model's "
                              "folder, or a verifier (e.g. {name: math})")
    if reward.gold_window < 2:
        raise RecipeError(f"reward.gold_window: the gap's trend is a slope over at least 2 steps, got "
                          f"{reward.gold_window}")
    if reward.stop_on_gold_drop < 0:
        raise RecipeError(f"reward.stop_on_gold_drop: must be >= 0 (0: never stop), got {reward.stop_on_gold_drop}")
    if reward.stop_on_gold_drop and not reward.gold:
        raise RecipeError("reward.stop_on_gold_drop: watches the gold reward, but reward.gold is empty; name one "
                          "(e.g. reward.gold=[{name: math}]) or set reward.stop_on_gold_drop=0")
    if reward.stop_on_gold_drop and not any(STAGE_KINDS[s.kind].optimises_reward for s in cfg.stages):
        raise RecipeError("reward.stop_on_gold_drop: watches stages that climb the rewards step by step (grpo, ppo) "
                          "and this recipe has none; remove it")
    if reward.stop_on_gold_drop and not cfg.logging.eval_every:
        raise RecipeError("reward.stop_on_gold_drop: counts held-out evaluations inside a stage, but "
                          "logging.eval_every is 0; set logging.eval_every (e.g. 10)")


def check_model_reward(cfg: RecipeConfig, i: int) -> None:
    """reward.rewards[i].path: only `name: model` reads it; a reward model folder, or an earlier reward_model stage's
    output that no stage scoring samples with the rewards runs before."""
    spec, where = cfg.reward.rewards[i], f"reward.rewards[{i}]"
    if spec.path and (spec.name != "model" or spec.import_path):
        raise RecipeError(f"{where}.path: only a reward with name: model reads it; remove it")
    if spec.name != "model" or spec.import_path:
        return
    if not spec.path:
        raise RecipeError(f"{where}.path: name: model needs the reward model: a folder, or the name of a "
                          "reward_model stage of this recipe")
    j = reward_model_stage(cfg.stages, spec.path)
    if j is None:
        if not (Path(spec.path).expanduser() / "config.json").is_file():
            stages = [checkpoint_name(s, k) for k, s in enumerate(cfg.stages) if s.kind == "reward_model"]
            raise RecipeError(f"{where}.path: '{spec.path}' is neither a reward model folder (with config.json) nor "
                              f"a reward_model stage of this recipe (those: {stages or 'none'})")
        return
    for k, stage in enumerate(cfg.stages[:j]):
        if stage.kind != "reward_model" and STAGE_KINDS[stage.kind].data(stage) == "problems":
            raise RecipeError(f"stages.{k}: a {stage.kind} stage scores its samples with reward.rewards, but "
                              f"{where} is the reward model stages.{j} trains later; move that stage before it, or "
                              "give the reward a trained model's folder")


def check_env(cfg: RecipeConfig) -> None:
    """The env section and the episode limits: a known environment, turns and a token budget that fit the context."""
    env, rollout = cfg.env, cfg.rollout
    if env.name and env.name not in names.ENVIRONMENTS:
        raise RecipeError(f"env.name: '{env.name}' is not one of {', '.join(names.ENVIRONMENTS)}, '' (no environment); "
                          "your own environment comes in by env.import_path")
    if env.name and env.import_path:
        raise RecipeError(f"env: give a built-in name or an import_path, not both (got '{env.name}' and "
                          f"'{env.import_path}')")
    if env.import_path and not re.fullmatch(r"[\w.]+:[\w.]+", env.import_path):
        raise RecipeError(f"env.import_path: '{env.import_path}' is not 'pkg.module:Class'")
    for i, tool in enumerate(env.tools):
        _one_of(f"env.tools[{i}]", tool, ("calculator", "python"))
    unknown = set(env.tool_options) - set(env.tools)
    if unknown:
        raise RecipeError(f"env.tool_options: options for {', '.join(sorted(unknown))}, which env.tools does not list")
    if rollout.max_turns < 1 or rollout.max_episode_tokens < 0:
        raise RecipeError(f"rollout.max_turns must be >= 1 and rollout.max_episode_tokens >= 0 (got "
                          f"{rollout.max_turns}, {rollout.max_episode_tokens})")
    if rollout.max_turns > 1 and not env.enabled:
        raise RecipeError(f"rollout.max_turns: {rollout.max_turns} turns need an environment to answer the model; "
                          "set env.name=tools (or env.import_path), or max_turns=1")
    if env.enabled and rollout.episode_tokens >= cfg.model.max_seq_len:
        raise RecipeError(f"rollout.max_episode_tokens: an episode of {rollout.episode_tokens} tokens leaves no room "
                          f"for its prompt in model.max_seq_len={cfg.model.max_seq_len}; lower it (or "
                          "rollout.max_new_tokens x rollout.max_turns), or raise model.max_seq_len")
    if cfg.data.tool_traces and (cfg.data.source != "synthetic" or cfg.data.verification):
        raise RecipeError("data.tool_traces: tool-use traces are built from the synthetic tasks; set "
                          "data.source=synthetic (and verification=false)")


def check_eval_sets(cfg: RecipeConfig) -> None:
    """Each further held-out set has a unique metric-safe name, its own eval_source and room for its answers."""
    seen = set()
    for i, e in enumerate(cfg.evals):
        where = f"evals.{i}"
        if not re.fullmatch(EVAL_SET_NAME, e.name) or e.name in RESERVED_EVAL_NAMES or e.name in seen:
            raise RecipeError(f"{where}.name: {e.name!r} must be unique, start with a letter, hold only letters, "
                              f"digits and _ . -, and not be one of {', '.join(RESERVED_EVAL_NAMES)}")
        seen.add(e.name)
        data = cfg.eval_data(i)
        if not data.eval_source:
            raise RecipeError(f"{where}.data.eval_source: required (a local file or a hub dataset of prompts with "
                              "gold answers); the recipe's own held-out set is evaluated already")
        check_data(f"{where}.data", data)
        if not 0 <= e.max_new_tokens < cfg.model.max_seq_len:
            raise RecipeError(f"{where}.max_new_tokens: must be in [0, model.max_seq_len={cfg.model.max_seq_len}), "
                              f"got {e.max_new_tokens}")


def check_data(where: str, data: DataConfig) -> None:
    """The checks of one data section that need no file read (columns and lengths are checked when loading)."""
    for key in ("source", "eval_source"):
        value = getattr(data, key)
        if value and value != "synthetic" and looks_local(value) and not Path(value).expanduser().exists():
            raise RecipeError(f"{where}.{key}: file '{value}' not found; expected 'synthetic', a local .jsonl/.json/.parquet/"
                              ".csv file or folder, or a hub dataset name such as openai/gsm8k")
    if data.source == "synthetic":
        for t in data.tasks:
            _one_of(f"{where}.tasks", t, ("add", "add_hard", "mul", "mul_hard"))
    elif data.verification:
        raise RecipeError(f"{where}.verification: judge examples are built from the synthetic tasks; "
                          f"set {where}.source=synthetic")
    _one_of(f"{where}.format", data.format, DATA_FORMATS)
    _one_of(f"{where}.chat_template", data.chat_template, ("auto", "none"))
    _one_of(f"{where}.truncation", data.truncation, ("drop", "truncate_left", "truncate_right"))
    try:
        data.prompt_template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise RecipeError(f"{where}.prompt_template: {data.prompt_template!r} may hold only the field {{prompt}} "
                          f"(double other braces: {{{{ }}}}); {type(e).__name__}: {e}") from e
    if "{prompt}" not in data.prompt_template:
        raise RecipeError(f"{where}.prompt_template: {data.prompt_template!r} has no {{prompt}}; the question would be lost")
    if not data.step_separator:
        raise RecipeError(f"{where}.step_separator: empty; a process reward model reads each step's score at its "
                          "separator (TRL's default is a newline)")
    if data.max_prompt_tokens < 0 or data.num_train < 1 or data.num_eval < 1:
        raise RecipeError(f"{where}: max_prompt_tokens must be >= 0, num_train and num_eval >= 1")
    if not 0.0 <= data.abstain_rate < 1.0:
        raise RecipeError(f"{where}.abstain_rate: must be in [0, 1), got {data.abstain_rate}")
    if not 0.0 < data.verification_wrong_rate < 1.0:
        raise RecipeError(f"{where}.verification_wrong_rate: must be in (0, 1), got {data.verification_wrong_rate}")
