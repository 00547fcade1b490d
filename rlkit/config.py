"""The recipe: typed, frozen dataclasses that are the one home of every default.

A recipe YAML holds only what it changes. Loading is strict: an unknown key names the closest valid one, a
wrong type names the key and the expected type. Cross-section checks live in `validate`.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rlkit.errors import RecipeError
from rlkit.stage_kinds import STAGE_KINDS, check_stage, one_of as _one_of


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local Hugging Face folder; empty builds a small Llama from the fields below
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_seq_len: int = 64  # positions; prompt + completion must fit
    tie_embeddings: bool = False
    init_seed: int = 0  # seed of the random initialisation when building from config


@dataclass(frozen=True)
class DataConfig:
    """Where a stage's examples come from and how they become token ids (rlkit.sources, rlkit.chat).

    A stage may override any of these with its own `data:` section (StageConfig.data)."""

    # "synthetic" (arithmetic tasks); a local .jsonl/.json/.parquet/.csv file or folder; or a hub dataset name
    source: str = "synthetic"
    subset: str = ""  # a hub dataset's configuration, e.g. "main" for openai/gsm8k
    split: str = "train"  # the split read from `source` (a local file has one split: "train")
    # TRL's dataset formats: "auto" (detected from the columns, as TRL does), "prompt_only", "prompt_completion",
    # "messages" (conversational language modelling), "preference" (prompt/chosen/rejected)
    format: str = "auto"
    tasks: List[str] = field(default_factory=lambda: ["add", "mul"])  # synthetic task families
    max_digits: int = 3  # operands have 1..max_digits digits (multiplication: second operand 1 digit)
    num_train: int = 20000  # training examples (synthetic: generated; a dataset: its first, after shuffling)
    num_eval: int = 256  # held-out problems (disjoint from training)
    eval_source: str = ""  # a dataset of held-out problems (its first num_eval); "": split from source
    eval_split: str = "train"  # the split read from eval_source (e.g. "test" for a hub dataset)
    prompt_key: str = "prompt"  # column names: the prompt, its gold answer, a worked solution (SFT target)
    answer_key: str = "answer"
    solution_key: str = "solution"
    chat_template: str = "auto"  # "auto": the tokenizer's chat template when it has one; "none": BOS + plain text
    system_prompt: str = ""  # a system turn before every prompt (plain text: a line before it)
    prompt_template: str = "{prompt}"  # how a text prompt becomes the user turn, e.g. "{prompt}\nAnswer after ####."
    max_prompt_tokens: int = 0  # longer rendered prompts are dropped and counted (0: model.max_seq_len bounds them)
    # SFT/DPO sequences longer than model.max_seq_len: "drop", "truncate_left" (keep the end) or "truncate_right"
    truncation: str = "drop"
    seed: int = 1234
    abstain_rate: float = 0.0  # synthetic: share of training targets replaced by "I don't know" (honesty recipes)
    verification: bool = False  # synthetic: judge-training examples instead (rewards.judge; recipes/judge.yaml)
    verification_wrong_rate: float = 0.5  # verification: share of candidate answers that are plausible wrong ones
    # synthetic: SFT targets are tool-use traces (the calculator called on the question, its answer, then the
    # answer), trained with the tool's output masked out; for recipes with env.name=tools
    tool_traces: bool = False


DATA_FORMATS = ("auto", "prompt_only", "prompt_completion", "messages", "preference")


@dataclass(frozen=True)
class RolloutConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    # engine weights: "auto" (bfloat16 where the engine's device computes it natively, else float32; rlkit.precision),
    # "float32", "bfloat16", "float16"
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    sync_dir: str = "/dev/shm/rlkit_sync"  # where trainer weights are written for the engine to reload
    sync_timeout_s: float = 60.0  # a weight sync that takes longer fails the run
    # multi-turn episodes (an `env` section; rlkit.episodes): at most this many assistant turns per episode
    max_turns: int = 1
    # tokens an episode may add after its prompt, sampled and environment tokens together (0: max_new_tokens x
    # max_turns); each turn still samples at most max_new_tokens
    max_episode_tokens: int = 0
    # GRPO/PPO: 0 samples each batch from the latest weights (on-policy, generation and training alternate); N >= 1
    # samples the next batches while the trainer updates, never training on samples more than N updates old
    # (needs algo.tis_cap > 0: the decoupled objective weights tokens by p_proximal / p_engine)
    max_staleness: int = 0

    @property
    def episode_tokens(self) -> int:
        """The most tokens an episode adds after its prompt (a single-turn completion: max_new_tokens)."""
        return self.max_episode_tokens or self.max_new_tokens * self.max_turns


@dataclass(frozen=True)
class EnvConfig:
    """The environment of multi-turn episodes (envs/): the policy answers, the environment replies, until it is done
    or rollout.max_turns / rollout.max_episode_tokens run out. Empty name and import_path: single-turn."""

    name: str = ""  # "" (no environment) or "tools" (envs.tools.ToolEnv)
    import_path: str = ""  # "pkg.module:Class" for your own envs.base.Environment
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the environment's constructor arguments
    tools: List[str] = field(default_factory=lambda: ["calculator"])  # name "tools": built-ins, calculator and python
    tool_options: Dict[str, Any] = field(default_factory=dict)  # per tool, e.g. {python: {wall_s: 2, memory_mb: 256}}

    @property
    def enabled(self) -> bool:
        return bool(self.name or self.import_path)


ENV_NAMES = ("", "tools")


@dataclass(frozen=True)
class RewardSpec:
    name: str = ""  # built-in: math, honesty, code, logic, format; or the logged label of an `import_path` class
    import_path: str = ""  # "pkg.module:Class" for a user reward class
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the reward's constructor


@dataclass(frozen=True)
class RewardConfig:
    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="math")])
    num_workers: int = 2  # worker processes that run verifiers
    timeout_s: float = 5.0  # hard deadline per sample; the worker is killed and replaced past it
    # what a verifier error does: "exclude" the sample, "score" it error_score, "fail" the run. A model's timeout is
    # no error: it keeps verdict "timeout" (counted) and scores as a wrong answer
    on_error: str = "fail"
    error_score: float = 0.0
    # a step (or evaluation) whose share of verifier errors passes this stops the run: a broken reward never trains
    # on silently excluded or error_score'd samples
    max_error_rate: float = 0.5


@dataclass(frozen=True)
class RefConfig:
    kl_estimator: str = "k3"  # k1 (log-ratio), k2 (squared log-ratio / 2) or k3 (Schulman's unbiased, >= 0)
    kl_coef: float = 0.02
    kl_in: str = "loss"  # "loss" (GRPO style) or "reward" (PPO style, per-token penalty)
    # the frozen reference's weights: "auto" (bfloat16 where its device computes it natively, else float32;
    # rlkit.precision), "float32", "bfloat16" or "float64" (exact tests)
    dtype: str = "auto"


@dataclass(frozen=True)
class TrainerConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 10
    # after warmup: "constant", or decaying to 0 at a stage's last optimizer step, "linear" or "cosine" (a half
    # cosine; transformers' get_linear/cosine_schedule_with_warmup). Each stage runs its own schedule.
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    micro_batch_size: int = 64  # most sequences per forward/backward; gradients accumulate across micro-batches
    # most real tokens per micro-batch (0: no token cap): rows are sorted by length and binned up to this budget
    # (and micro_batch_size rows); a row longer than the budget runs alone. The update does not change (rlkit.losses)
    micro_batch_tokens: int = 0
    # a micro-batch's rows run as one sequence (position_ids restart per row, attention stays within a row): no
    # compute on padding. Attention is varlen with sdpa (rlkit.attention: SDPA row by row, no mask) and
    # flash_attention_2; eager gets a dense (T, T) mask over the micro-batch's T tokens, so its attention grows with
    # T squared (bench/lengths.py, bench/packing.py). False right-pads each micro-batch to its longest row
    packing: bool = False
    # "auto", "sdpa", "eager" or "flash_attention_2" (needs flash-attn, the model on CUDA and bf16/fp16 compute;
    # packed rows then run varlen). "auto": flash_attention_2 where it runs, else sdpa (rlkit.attention)
    attn_implementation: str = "auto"
    # recompute each transformer block in the backward (non-reentrant) instead of keeping its activations:
    # about a third more compute for activation memory of one block; policy and critic, with or without LoRA
    gradient_checkpointing: bool = False
    # run each transformer block's forward and backward through torch.compile (Inductor, CPU or CUDA; a C++
    # compiler on CPU), dynamic shapes so new micro-batch lengths do not recompile; policy, critic and reference.
    # The first step pays the compile (perf/compile_seconds)
    compile: bool = False
    logprob_impl: str = "auto"  # "auto", "torch" or "triton" (see kernels.fused_logprobs)
    # compute dtype of the trained model: "auto" (bfloat16 where the trainer's device computes it natively, else
    # float32; decided at start, rlkit.precision); "float32"; "bfloat16": mixed precision, bf16 forward/backward over
    # float32 weights and optimizer state (see param_dtype); "float64": everything in float64 (exact tests)
    dtype: str = "auto"
    seed: int = 0
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    lora_rank: int = 0  # > 0 trains LoRA adapters (peft) of this rank instead of all weights
    lora_alpha: float = 16.0
    # what a LoRA run pushes to the engines: "merged" weights (W + alpha/r B A), or the "adapter" only (vLLM serves
    # the frozen base, synced once per stage, with the adapter as a LoRA request)
    lora_sync: str = "merged"
    lora_targets: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    @property
    def param_dtype(self) -> str:
        """The dtype of the held (master) weights, their gradients and the optimizer state: float32 under bfloat16
        mixed precision (and under `auto`, which is bfloat16 or float32), else `dtype`. Hugging Face checkpoints are
        still written in `dtype`."""
        return "float32" if self.dtype in ("bfloat16", "auto") else self.dtype


@dataclass(frozen=True)
class AlgoConfig:
    group_size: int = 8  # GRPO samples per prompt
    advantage_estimator: str = "grpo"  # "grpo", "rloo", "reinforce_pp", or "pkg.module:function" (rlkit.advantages)
    epsilon: float = 0.2  # clip range below 1
    epsilon_high: float = 0.2  # clip range above 1 (DAPO clip-higher when > epsilon)
    # "token-mean" (DAPO), "seq-mean-token-mean" (GRPO; GSPO) or "seq-mean-token-sum-norm" (Dr.GRPO: summed tokens
    # divided by sequences x rollout.max_new_tokens)
    loss_agg: str = "token-mean"
    # "token" (PPO/GRPO) or "sequence" (GSPO: length-normalised sequence ratio; needs loss_agg seq-mean-token-mean)
    ratio_level: str = "token"
    # "clip" (PPO/GRPO clipped surrogate) or "cispo" (MiniMax-M1: -sg(min(ratio, 1 + epsilon_high)) * A * log-prob)
    pg_loss: str = "clip"
    entropy_coef: float = 0.0  # entropy bonus: loss - coef * per-token entropy, aggregated like the loss; 0 = off
    tis_cap: float = 0.0  # truncated importance sampling: weight tokens by min(p_trainer / p_engine, cap); 0 = off
    drop_uniform_groups: bool = False  # DAPO dynamic sampling: groups whose rewards are all equal leave the loss
    resample_rounds: int = 1  # with drop_uniform_groups: draw up to N prompt batches to fill the batch with signal
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # penalty at rollout.max_new_tokens, ramping linearly over the buffer
    scale_rewards: bool = True  # divide group-centred rewards by their std (Dr.GRPO sets False)
    ppo_epochs: int = 1  # optimizer passes over each rollout batch
    ppo_minibatches: int = 1  # shuffled minibatches per pass, one optimizer step each (GRPO and PPO)
    target_kl: float = 0.0  # stop a step's passes once a minibatch's approx_kl exceeds it (cleanrl); 0 = never
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    dpo_nll_coef: float = 0.0  # weight of the chosen response's NLL (RPO, Pang et al. 2024; Llama 3 uses 0.2)
    # divide each log-ratio by its response's length; unset: each loss's convention (ipo: yes, as the IPO authors'
    # code and TRL; sigmoid: no, as the DPO paper). See dpo_length_normalized.
    dpo_length_normalize: Optional[bool] = None
    gamma: float = 1.0  # PPO discount
    gae_lambda: float = 0.95  # PPO GAE lambda
    value_coef: float = 0.5
    value_clip: float = 0.2

    @property
    def dpo_length_normalized(self) -> bool:
        """Whether DPO/IPO log-ratios are averaged over response tokens (dpo_length_normalize, else the loss's own)."""
        return self.dpo_loss == "ipo" if self.dpo_length_normalize is None else self.dpo_length_normalize


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "runs/quickstart"
    overwrite: bool = False  # refuse to write into an existing run directory unless set
    wandb_mode: str = "offline"  # "online", "offline" or "disabled"
    wandb_project: str = "rlkit"
    log_every: int = 10
    eval_temperature: float = 0.0  # greedy held-out evaluation
    eval_every: int = 0  # also evaluate every N steps inside a stage (0: only before and after each stage)
    best_metric: str = "accuracy"  # the held-out metric whose best value keeps checkpoints/best
    eval_samples: int = 0  # also sample N answers per held-out problem for pass@k (0: greedy only)
    eval_sample_temperature: float = 1.0
    eval_pass_k: List[int] = field(default_factory=lambda: [1, 4])  # k values reported when eval_samples > 0
    table_rows: int = 8  # completions per table (eval/completions at each evaluation, <stage>/completions)
    completions_every: int = 10  # a table of training completions every N steps of sampling stages (0: never)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # write a resume point every N steps inside a stage (0: only between stages)
    keep: int = 2  # resume points kept; older ones are deleted only after a newer one is complete


@dataclass(frozen=True)
class ClusterConfig:
    backend: str = "local"  # "local": every worker in this process; "ray": each worker a Ray actor
    rollout_engines: int = 1  # vLLM engines in the rollout pool (prompts are split across them)
    trainer_ranks: int = 1  # FSDP2 ranks of the trainer group (> 1 needs backend "ray")
    cpus_per_trainer: float = 1.0
    gpus_per_trainer: float = 0.0
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    # "": start a Ray on this machine (or join the cluster RAY_ADDRESS names, as `ray job submit` sets it);
    # "auto" or "host:port": join that running cluster (started with `ray start`), taking its resources as they are
    address: str = ""
    # Ray's runtime_env for every actor of the run, e.g. {env_vars: {HF_HOME: /shared/hf}, working_dir: .}
    runtime_env: Dict[str, Any] = field(default_factory=dict)
    # the trainer ranks' placement group: "pack" (as few nodes as they fit on: FSDP2's collectives stay local),
    # "spread" (one per node where possible), or "strict_pack" / "strict_spread" (all on one node / each its own);
    # the engines are always spread
    placement: str = "pack"
    placement_timeout_s: float = 300.0  # a worker group not placed whole by then fails the run, naming the group


@dataclass(frozen=True)
class StageConfig:
    kind: str = "sft"  # one of rlkit.stage_kinds.STAGE_KINDS
    name: str = ""  # checkpoint folder name; defaults to "<index>_<kind>"
    steps: int = 100
    batch_size: int = 64  # sequences (SFT, RFT, distill), pairs (DPO) or prompts (GRPO/PPO) per step
    lr: Optional[float] = None  # defaults to trainer.lr
    warmup_steps: Optional[int] = None  # defaults to trainer.warmup_steps
    save_every: int = 0  # also keep a snapshot checkpoint every N steps (what an `average` stage averages)
    # rft / distill: sample `samples` completions per prompt, keep those the rewards judge correct
    samples: int = 8  # also DPO with pairs=online: samples per prompt to pick chosen/rejected from
    keep: str = "best"  # "best": the best accepted completion per prompt; "all": every distinct accepted one
    teacher: str = ""  # distill: the teacher's local Hugging Face checkpoint, served by its own engine
    # dpo
    # "policy": gold vs the starting policy's wrong answer; "online": per round, from the policy; "dataset": the
    # chosen/rejected pairs of a preference dataset (the stage's data)
    pairs: str = "policy"
    rounds: int = 1  # pairs=online: sample, label, train, repeat; steps are split evenly over the rounds
    # average: the weights of the last `last` snapshots (save_every) of stage `source` (default: the previous one)
    source: str = ""  # a stage name or its checkpoint folder (e.g. 01_sft)
    last: int = 3
    method: str = "uniform"  # "uniform" or "ema" (newest weighs most: weights ema_decay^age, normalised)
    ema_decay: float = 0.5
    # this stage's own data: any DataConfig keys, overriding the recipe's `data` section (e.g. {source: sft.jsonl})
    data: Dict[str, Any] = field(default_factory=dict)


PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")  # cluster.placement: Ray's strategies, lower-case
RUNTIME_ENV_KEYS = ("env_vars", "working_dir", "py_modules", "pip", "uv", "conda", "excludes", "config")

MAX_ENGINE_LORA_RANK = 512  # the largest adapter rank vLLM serves


@dataclass(frozen=True)
class EvalSetConfig:
    """A further held-out set, evaluated beside the recipe's before and after every stage (not at eval_every):
    metrics eval/<name>/<metric>, in summary.json as <name>/<metric> (logging.best_metric may name one)."""

    name: str = ""  # the metrics' prefix, e.g. gsm8k
    # DataConfig keys over the recipe's data section; eval_source (a file or hub dataset) is required, e.g.
    # {eval_source: data/gsm8k_test.jsonl, num_eval: 200, prompt_key: question}
    data: Dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 0  # answer length limit for this set (0: rollout.max_new_tokens)


EVAL_SET_NAME = r"[A-Za-z][A-Za-z0-9_.-]*"
RESERVED_EVAL_NAMES = ("task", "verdict", "completions")  # eval/<these>/... are the recipe's own metrics


@dataclass(frozen=True)
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # multi-turn episodes (none by default)
    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    evals: List[EvalSetConfig] = field(default_factory=list)  # further held-out sets (EvalSetConfig)
    resume: str = "never"  # "auto": continue logging.output_dir from its latest resume point, if it has one

    def stage_lr(self, index: int) -> float:
        """A stage's learning rate: its own, else trainer.lr."""
        lr = self.stages[index].lr
        return self.trainer.lr if lr is None else lr

    def stage_data(self, index: int) -> DataConfig:
        """A stage's data section: the recipe's, with the stage's own `data` keys over it."""
        return _merge_data(self.data, self.stages[index].data, f"stages.{index}.data")

    def eval_data(self, index: int) -> DataConfig:
        """A further held-out set's data section: the recipe's, with the set's `data` keys over it."""
        return _merge_data(self.data, self.evals[index].data, f"evals.{index}.data")

    def stage_warmup(self, index: int) -> int:
        warmup = self.stages[index].warmup_steps
        return self.trainer.warmup_steps if warmup is None else warmup

    def stage_updates(self, index: int) -> int:
        """Optimizer steps a stage takes (where trainer.lr_schedule decays to 0): its steps, times the optimizer
        steps of each (GRPO and PPO: ppo_epochs x ppo_minibatches; a target_kl early stop takes fewer)."""
        stage = self.stages[index]
        return stage.steps * STAGE_KINDS[stage.kind].updates_per_step(self)


def _merge_data(base: DataConfig, overrides: Dict[str, Any], where: str) -> DataConfig:
    if not overrides:
        return base
    for key in overrides:
        if key not in {f.name for f in fields(DataConfig)}:
            raise RecipeError(f"{where}: unknown key '{key}' in DataConfig.{_closest(key, DataConfig)}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(base), overrides))
    except OmegaConfBaseException as e:
        raise RecipeError(f"{where}: bad value for '{getattr(e, 'full_key', '')}': {str(e).splitlines()[0]}") from e


def _closest(key: str, cls: type) -> str:
    names = [f.name for f in fields(cls)] if is_dataclass(cls) else []
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(names)}."


def _section_class(full_key: str) -> type:
    """The dataclass that holds `full_key` (e.g. 'rollout.temprature' -> RolloutConfig)."""
    cls: type = RecipeConfig
    for part in full_key.split(".")[:-1]:
        hint = typing.get_type_hints(cls).get(part.split("[")[0])
        if hint is None:
            continue  # a list index such as stages.0
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else hint  # List[StageConfig] -> StageConfig
        if is_dataclass(inner):
            cls = inner
    return cls


def _friendly(err: OmegaConfBaseException, source: str) -> RecipeError:
    full_key = getattr(err, "full_key", "") or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        key = full_key.split(".")[-1] if full_key else str(getattr(err, "key", ""))
        obj = getattr(err, "object_type", None)
        section = obj if obj is not None and is_dataclass(obj) else _section_class(full_key)
        return RecipeError(f"{source}: unknown key '{full_key or key}' in {section.__name__}.{_closest(key, section)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return RecipeError(f"{source}: bad value for '{full_key}': {msg}")
    return RecipeError(f"{source}: {str(err).splitlines()[0]}")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Defaults <- YAML file <- `key=value` overrides, strictly typed, then validated."""
    schema = OmegaConf.structured(RecipeConfig)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe: file '{path}' not found; expected a YAML recipe such as recipes/quickstart.yaml")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as e:  # yaml.YAMLError and friends
            raise RecipeError(f"recipe: '{path}' is not valid YAML: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override '{item}': expected key=value, e.g. rollout.temperature=0.7")
    try:
        merged = OmegaConf.merge(*layers)
        if overrides:
            # Overrides edit the merged tree as plain data, then it is re-checked against the schema;
            # unlike a merged dotlist this understands list indices (stages.0.steps=5).
            tree = OmegaConf.to_container(merged)
            for item in overrides:
                key, _, raw = item.partition("=")
                _set_path(tree, key.strip(), _parse_value(raw), item)
            merged = OmegaConf.merge(schema, tree)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = [f"recipe '{path}'"] if path else []
        where += [f"overrides {' '.join(overrides)}"] if overrides else []
        raise _friendly(e, " + ".join(where) or "defaults") from e
    validate(cfg)
    return cfg


def _parse_value(raw: str) -> Any:
    """An override's value as YAML (numbers, lists, {a: 1}); text that is not valid YAML stays text, so a prompt
    template such as `{prompt}\nAnswer:` needs no quoting (the schema still checks its type).

    >>> _parse_value("0.5"), _parse_value("[1, 2]"), _parse_value("{prompt} Answer after ####.")
    (0.5, [1, 2], '{prompt} Answer after ####.')
    """
    if not raw:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_path(tree: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override '{item}': '{where}' has {len(node)} entries; '{part}' is not an index of it")
            part = int(part)
        elif not isinstance(node, dict):
            raise RecipeError(f"override '{item}': '{where}' is a value, not a section")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part] if isinstance(node, list) or part in node else node.setdefault(part, {})


def to_yaml(cfg: RecipeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# The range of every numeric field a user sets (the data section's are in check_data, a stage's in validate).
NUMERIC_RANGES = {
    "> 0": ["model.hidden_size", "model.intermediate_size", "model.num_layers", "model.num_heads", "model.max_seq_len",
            "rollout.max_new_tokens", "rollout.kv_cache_gib", "rollout.sync_timeout_s", "trainer.lr",
            "trainer.grad_clip", "trainer.micro_batch_size", "trainer.lora_alpha", "algo.group_size",
            "algo.epsilon_high", "algo.ppo_epochs", "algo.ppo_minibatches", "algo.dpo_beta", "algo.value_clip",
            "cluster.rollout_engines",
            "cluster.trainer_ranks", "reward.num_workers", "reward.timeout_s", "logging.log_every",
            "cluster.placement_timeout_s"],
    ">= 0": ["rollout.temperature", "ref.kl_coef", "trainer.weight_decay", "trainer.warmup_steps",
             "trainer.num_threads", "trainer.lora_rank", "trainer.micro_batch_tokens", "algo.tis_cap",
             "algo.overlong_buffer", "algo.overlong_penalty", "algo.dpo_nll_coef", "algo.value_coef",
             "algo.entropy_coef", "algo.target_kl", "rollout.max_staleness",
             "logging.eval_temperature", "logging.eval_sample_temperature", "cluster.cpus_per_trainer",
             "cluster.gpus_per_trainer", "cluster.cpus_per_engine", "cluster.gpus_per_engine", "checkpoint.every"],
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
    """Checks that span fields or sections; each names the field and the fix."""
    check_ranges(cfg)
    if not cfg.stages:
        raise RecipeError("stages: the recipe has no stages; add at least one, e.g. [{kind: sft}]")
    for i in range(len(cfg.stages)):
        check_stage(cfg, i)  # its kind's fields and checks (rlkit.stage_kinds)
    _one_of("rollout.dtype", cfg.rollout.dtype, ("auto", "float32", "bfloat16", "float16"))
    _one_of("ref.kl_estimator", cfg.ref.kl_estimator, ("k1", "k2", "k3"))
    _one_of("ref.kl_in", cfg.ref.kl_in, ("loss", "reward"))
    _one_of("algo.loss_agg", cfg.algo.loss_agg, ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))
    _one_of("algo.ratio_level", cfg.algo.ratio_level, ("token", "sequence"))
    _one_of("algo.pg_loss", cfg.algo.pg_loss, ("clip", "cispo"))
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
    _one_of("algo.dpo_loss", cfg.algo.dpo_loss, ("sigmoid", "ipo"))
    _one_of("trainer.dtype", cfg.trainer.dtype, ("auto", "float32", "bfloat16", "float64"))
    _one_of("trainer.attn_implementation", cfg.trainer.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2"))
    _one_of("ref.dtype", cfg.ref.dtype, ("auto", "float32", "bfloat16", "float64"))
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
    _one_of("logging.best_metric", cfg.logging.best_metric, ("accuracy", "mean_reward"))
    if cfg.logging.eval_every < 0 or cfg.logging.log_every < 1:
        raise RecipeError("logging.eval_every must be >= 0 and logging.log_every >= 1")
    _one_of("logging.wandb_mode", cfg.logging.wandb_mode, ("online", "offline", "disabled"))
    lg = cfg.logging
    if lg.eval_samples and not all(1 <= k <= lg.eval_samples for k in lg.eval_pass_k):
        raise RecipeError(f"logging.eval_pass_k: each k must be between 1 and logging.eval_samples "
                          f"({lg.eval_samples}), got {list(lg.eval_pass_k)}")
    if lg.eval_samples < 0 or lg.table_rows < 0 or lg.completions_every < 0:
        raise RecipeError("logging.eval_samples, logging.table_rows and logging.completions_every must be >= 0")
    _one_of("resume", cfg.resume, ("never", "auto"))
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise RecipeError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    _one_of("reward.on_error", cfg.reward.on_error, ("exclude", "score", "fail"))
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise RecipeError(
            f"model.hidden_size: {cfg.model.hidden_size} is not divisible by model.num_heads={cfg.model.num_heads}"
        )
    check_data("data", cfg.data)
    for i, stage in enumerate(cfg.stages):
        if stage.data:
            check_data(f"stages.{i}.data", cfg.stage_data(i))
    check_eval_sets(cfg)
    _one_of("cluster.backend", cfg.cluster.backend, ("local", "ray"))
    if cfg.cluster.trainer_ranks > 1 and cfg.cluster.backend != "ray":
        raise RecipeError("cluster.trainer_ranks: more than one rank needs cluster.backend=ray")
    if cfg.cluster.rollout_engines > 1 and cfg.cluster.backend != "ray":
        raise RecipeError("cluster.rollout_engines: more than one engine needs cluster.backend=ray")
    _one_of("cluster.placement", cfg.cluster.placement, PLACEMENTS)
    for key, value in (("address", cfg.cluster.address), ("runtime_env", cfg.cluster.runtime_env)):
        if value and cfg.cluster.backend != "ray":
            raise RecipeError(f"cluster.{key}: only a Ray run joins a cluster or takes a runtime_env; set "
                              "cluster.backend=ray or remove it")
    unknown = sorted(set(cfg.cluster.runtime_env) - set(RUNTIME_ENV_KEYS))
    if unknown:
        raise RecipeError(f"cluster.runtime_env: unknown key '{unknown[0]}'; rlkit passes on "
                          f"{', '.join(RUNTIME_ENV_KEYS)}")
    if cfg.rollout.max_staleness and not cfg.algo.tis_cap:
        raise RecipeError(
            f"rollout.max_staleness: {cfg.rollout.max_staleness} trains on samples from older weights, which the "
            "decoupled objective corrects with truncated importance weights; set algo.tis_cap (e.g. 2.0)"
        )
    check_env(cfg)
    if not cfg.reward.rewards:
        raise RecipeError("reward.rewards: empty; name at least one reward, e.g. [{name: math}]")
    for i, spec in enumerate(cfg.reward.rewards):
        if not spec.name and not spec.import_path:
            raise RecipeError(f"reward.rewards[{i}]: give a built-in name (e.g. math) or an import_path 'pkg.mod:Class'")
    if cfg.reward.timeout_s <= 0 or cfg.reward.num_workers < 1:
        raise RecipeError("reward.timeout_s must be > 0 and reward.num_workers >= 1")


def check_env(cfg: RecipeConfig) -> None:
    """The env section and the episode limits: a known environment, turns and a token budget that fit the context."""
    env, rollout = cfg.env, cfg.rollout
    if env.name not in ENV_NAMES:
        raise RecipeError(f"env.name: '{env.name}' is not one of tools, '' (no environment); "
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


# What a hub id looks like ("org/name"); anything else that does not exist is a missing local path.
HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz")


def looks_local(source: str) -> bool:
    """Whether `source` names a local path (it exists, or has a path's shape) rather than a hub name.

    >>> looks_local("openai/gsm8k"), looks_local("data/sft.jsonl"), looks_local("./gsm8k"), looks_local("/x/y")
    (False, True, True, True)
    """
    return (Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES)
            or not re.fullmatch(HUB_ID, source))


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
    if data.max_prompt_tokens < 0 or data.num_train < 1 or data.num_eval < 1:
        raise RecipeError(f"{where}: max_prompt_tokens must be >= 0, num_train and num_eval >= 1")
    if not 0.0 <= data.abstain_rate < 1.0:
        raise RecipeError(f"{where}.abstain_rate: must be in [0, 1), got {data.abstain_rate}")
    if not 0.0 < data.verification_wrong_rate < 1.0:
        raise RecipeError(f"{where}.verification_wrong_rate: must be in (0, 1), got {data.verification_wrong_rate}")
