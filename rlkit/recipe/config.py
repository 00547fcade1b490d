"""The recipe's schema: typed, frozen dataclasses that are the one home of every default, one per section.

A recipe YAML holds only what it changes. Loading is strict (rlkit.recipe.load): an unknown key names the closest
valid one, a wrong type names the key and the expected type. Cross-section checks live in rlkit.recipe.checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlkit.recipe.errors import RecipeError, closest as _closest


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
    """Where a stage's examples come from and how they become token ids (rlkit.data.sources, rlkit.data.chat).

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
    verification: bool = False  # synthetic: judge-training examples instead (rlkit.rewards.judge; recipes/judge.yaml)
    verification_wrong_rate: float = 0.5  # verification: share of candidate answers that are plausible wrong ones
    # synthetic: SFT targets are tool-use traces (the calculator called on the question, its answer, then the
    # answer), trained with the tool's output masked out; for recipes with env.name=tools
    tool_traces: bool = False
    # format stepwise (a process reward model): the text after each step (TRL's PRMConfig.step_separator); the
    # step's score is read at its separator's last token
    step_separator: str = "\n"


WEIGHT_TRANSFERS = ("auto", "gloo", "nccl", "ipc", "file")  # rollout.weight_transfer
# "stepwise": TRL's stepwise supervision (prompt, completions: a list of steps, labels: a bool per step), for a
# reward_model stage that trains a process reward model
DATA_FORMATS = ("auto", "prompt_only", "prompt_completion", "messages", "preference", "stepwise")


@dataclass(frozen=True)
class RolloutConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    # engine weights: "auto" (bfloat16 where the engine's device computes it natively, else float32; rlkit.training.precision),
    # "float32", "bfloat16", "float16"
    dtype: str = "auto"
    kv_cache_gib: float = 1.0  # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.5  # on GPU: vLLM's share of each GPU (weights, activations and KV cache)
    # on GPU: the KV cache's size per GPU in GiB (vLLM's kv_cache_memory_bytes), in place of what
    # gpu_memory_utilization leaves for it; 0 = sized by gpu_memory_utilization
    gpu_kv_cache_gib: float = 0.0
    enforce_eager: bool = True
    # GPUs one engine spans with tensor parallelism (vLLM's workers, on one node); cluster.gpus_per_engine must equal it
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256  # sequences an engine decodes at once (vLLM's max_num_seqs)
    # further vLLM engine arguments, passed to vllm.LLM as they are (e.g. {enable_prefix_caching: false}); checked at
    # load against vLLM's EngineArgs; the ones rlkit sets from other fields (model, dtype, seed, ...) are refused
    engine_kwargs: Dict[str, Any] = field(default_factory=dict)
    sync_dir: str = "/dev/shm/rlkit_sync"  # where trainer weights are written for the engine to reload
    sync_timeout_s: float = 60.0  # a weight sync that takes longer fails the run
    # how weights reach the engines (rlkit.rollout.weight_transfer): "gloo" (trainer rank 0 broadcasts to every engine
    # worker over a gloo group of its own; CPUs), "nccl" (the same over NCCL; GPUs), "ipc" (an engine sharing the
    # trainer's GPU, cluster.backend local), "file" (safetensors in sync_dir, through the driver; the fallback);
    # "auto": nccl with CUDA (cluster.gpus_per_engine > 0, or a GPU in a local run), else gloo
    weight_transfer: str = "auto"
    sync_bucket_mb: float = 256.0  # gloo/nccl/ipc: weights go in buffers of this size, one at a time
    # multi-turn episodes (an `env` section; rlkit.algorithms.episodes): at most this many assistant turns per episode
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

    name: str = ""  # "" (no environment) or "tools" (rlkit.envs.tools.ToolEnv)
    import_path: str = ""  # "pkg.module:Class" for your own rlkit.envs.base.Environment
    kwargs: Dict[str, Any] = field(default_factory=dict)  # the environment's constructor arguments
    tools: List[str] = field(default_factory=lambda: ["calculator"])  # name "tools": built-ins, calculator and python
    tool_options: Dict[str, Any] = field(default_factory=dict)  # per tool, e.g. {python: {wall_s: 2, memory_mb: 256}}

    @property
    def enabled(self) -> bool:
        return bool(self.name or self.import_path)


@dataclass(frozen=True)
class RewardSpec:
    name: str = ""  # built-in: math, honesty, code, logic, format, judge, model; or the logged label of an `import_path` class
    import_path: str = ""  # "pkg.module:Class" for a user reward class
    weight: float = 1.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to the reward's constructor
    # name: model: the trained reward model's folder, or the `name` (or checkpoint folder, e.g. 02_reward_model) of
    # an earlier reward_model stage of this recipe, whose checkpoint it then scores with once that stage has trained
    path: str = ""


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
    # gold rewards (same entries as `rewards`): scored on every rollout and evaluation beside the trained rewards
    # (the proxy), never trained on. GRPO/PPO log proxy and gold side by side, their correlation over the batch and
    # the trend of their gap (rlkit.algorithms.gold); evaluations log eval/gold/accuracy and eval/gold/mean_reward
    gold: List[RewardSpec] = field(default_factory=list)
    gold_window: int = 10  # steps over which the gap's trend (least-squares slope of proxy - gold) is taken
    # N > 0: a GRPO or PPO stage stops (its checkpoint kept) once the held-out gold reward fell at N consecutive
    # evaluations (logging.eval_every) while the held-out proxy reward rose at each; 0: never
    stop_on_gold_drop: int = 0


@dataclass(frozen=True)
class RefConfig:
    kl_estimator: str = "k3"  # k1 (log-ratio), k2 (squared log-ratio / 2) or k3 (Schulman's unbiased, >= 0)
    kl_coef: float = 0.02
    kl_in: str = "loss"  # "loss" (GRPO style) or "reward" (PPO style, per-token penalty)
    # the frozen reference's weights: "auto" (bfloat16 where its device computes it natively, else float32;
    # rlkit.training.precision), "float32", "bfloat16" or "float64" (exact tests)
    dtype: str = "auto"
    # where the reference runs: "trainer" (on the policy's ranks, sharded with FSDP2 like the policy: it fits where
    # the policy fits and needs no device of its own, as verl's actor_rollout_ref worker holds it) or "actor" (one
    # unsharded actor of its own, reserving cluster.gpus_per_trainer). The same log-probs either way.
    placement: str = "trainer"


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
    # (and micro_batch_size rows); a row longer than the budget runs alone. The update does not change (rlkit.training.losses)
    micro_batch_tokens: int = 0
    # a micro-batch's rows run as one sequence (position_ids restart per row, attention stays within a row): no
    # compute on padding. Attention is varlen with sdpa (rlkit.training.attention: SDPA row by row, no mask) and
    # flash_attention_2; eager gets a dense (T, T) mask over the micro-batch's T tokens, so its attention grows with
    # T squared (bench/lengths.py, bench/packing.py). False right-pads each micro-batch to its longest row
    packing: bool = False
    # "auto", "sdpa", "eager" or "flash_attention_2" (needs flash-attn, the model on CUDA and bf16/fp16 compute;
    # packed rows then run varlen). "auto": flash_attention_2 where it runs, else sdpa (rlkit.training.attention)
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
    # float32; decided at start, rlkit.training.precision); "float32"; "bfloat16": mixed precision, bf16 forward/backward over
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
    advantage_estimator: str = "grpo"  # "grpo", "rloo", "reinforce_pp", or "pkg.module:function" (rlkit.algorithms.advantages)
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
    # reward_model stages: TRL's center_rewards_coefficient, coef x mean((r_chosen + r_rejected)^2) added to the
    # Bradley-Terry loss so the rewards stay centred on 0 (Eisenstein et al. 2023); 0 = off
    rm_center_coef: float = 0.0
    gamma: float = 1.0  # PPO discount
    gae_lambda: float = 0.95  # PPO GAE lambda
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
    # reward scorer actors, spread over the nodes: a batch's samples are split across them. Each reserves
    # reward.num_workers CPUs, the worker processes it spawns (which Ray would not count)
    scorer_actors: int = 1


@dataclass(frozen=True)
class StageConfig:
    kind: str = "sft"  # one of rlkit.recipe.stage_kinds.STAGE_KINDS
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
    # the policy this stage starts from: an earlier stage's checkpoint (its name or folder, e.g. 01_sft), the run's
    # start (00_init); "": the policy the stages before left (a branch: later stages continue from this one's)
    start: str = ""
    # dpo
    # "policy": gold vs the starting policy's wrong answer; "online": per round, from the policy; "dataset": the
    # chosen/rejected pairs of a preference dataset (the stage's data). reward_model: "dataset" (a preference or,
    # with data.format stepwise, a stepwise-supervision dataset) or "policy" (`samples` answers per training prompt
    # from the current policy, a correct one against each wrong one as the recipe's rewards judge them)
    pairs: str = "policy"
    rounds: int = 1  # pairs=online: sample, label, train, repeat; steps are split evenly over the rounds
    # reward_model: the checkpoint its transformer starts from: an earlier stage's (its name or folder) or a local
    # Hugging Face folder with the policy's tokenizer (the pairs are the policy's token ids); "": the policy
    model: str = ""
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


RESERVED_EVAL_NAMES = ("task", "verdict", "completions", "gold")  # eval/<these>/... are the recipe's own metrics


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
