import textwrap

import pytest

from rlkit.recipe import RecipeConfig, RecipeError, load_recipe, stage_updates, to_yaml


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_load_and_are_frozen():
    cfg = load_recipe()
    assert isinstance(cfg, RecipeConfig)
    assert cfg.ref.kl_estimator == "k3"
    with pytest.raises(AttributeError):
        cfg.trainer.lr = 1.0  # frozen dataclass


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, """
        trainer: {lr: 0.01}
        stages:
          - {kind: sft, steps: 5}
          - {kind: grpo, steps: 7, lr: 1.0e-5}
    """)
    cfg = load_recipe(path, ["stages.1.steps=9", "rollout.temperature=0.7", "data.tasks=[add]"])
    assert cfg.trainer.lr == 0.01
    assert [s.kind for s in cfg.stages] == ["sft", "grpo"]
    assert cfg.stages[1].steps == 9 and cfg.stages[1].lr == 1e-5 and cfg.stages[0].lr is None
    assert cfg.rollout.temperature == 0.7 and cfg.data.tasks == ["add"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["rollout.temprature=0.7"], "unknown key 'rollout.temprature' in RolloutConfig. Did you mean 'temperature'?"),
        (["stages.0.stepz=3"], "unknown key 'stepz' in StageConfig. Did you mean 'steps'?"),
        (["reward.rewards.0.nme=x"], "in RewardSpec. Did you mean 'name'?"),
        (["trainr.lr=1"], "Did you mean 'trainer'?"),
        (["trainer.lr=abc"], "bad value for 'trainer.lr'"),
        (["algo.group_size=2.5"], "bad value for 'algo.group_size'"),
        (["stages.3.steps=1"], "'stages' has 1 entries"),
        (["trainer.lr"], "expected key=value"),
        (["stages.0.kind=rl"], "stages.0.kind: 'rl' is not one of sft, dpo, grpo"),
        (["ref.kl_estimator=k4"], "ref.kl_estimator: 'k4' is not one of k1, k2, k3"),
        (["model.num_heads=3"], "model.hidden_size: 128 is not divisible by model.num_heads=3"),
        (["rollout.dtype=fp8"], "rollout.dtype: 'fp8' is not one of auto, float32, bfloat16, float16"),
        (["trainer.lora_sync=adapters"], "trainer.lora_sync: 'adapters' is not one of merged, adapter"),
        (["trainer.micro_batch_tokens=-1"], "trainer.micro_batch_tokens: must be >= 0, got -1"),
        (["trainer.attn_implementation=flash"], "trainer.attn_implementation: 'flash' is not one of auto, sdpa, eager"),
        (["ref.dtype=fp8"], "ref.dtype: 'fp8' is not one of auto, float32, bfloat16, float64"),
        (["trainer.lora_sync=adapter"], "trainer.lora_sync: 'adapter' needs trainer.lora_rank between 1 and 512"),
        # algorithm mixes that are not their paper's
        (["algo.ratio_level=sequence"], "algo.ratio_level: 'sequence' is GSPO"),
        (["algo.ratio_level=sequence", "algo.loss_agg=seq-mean-token-sum-norm"],
         "set algo.loss_agg=seq-mean-token-mean"),
        (["algo.ratio_level=sequence", "algo.loss_agg=seq-mean-token-mean", "algo.pg_loss=cispo"], "algo.pg_loss=clip"),
        (["algo.pg_loss=ppo"], "algo.pg_loss: 'ppo' is not one of clip, cispo"),
        (["algo.loss_agg=seq-sum"], "is not one of token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        # asynchronous RL, minibatches, stage checks moved to load time
        (["rollout.max_staleness=1"], "rollout.max_staleness: 1 trains on samples from older weights"),
        (["rollout.max_staleness=-1"], "rollout.max_staleness: must be >= 0, got -1"),
        (["stages=[{kind: grpo, batch_size: 3}]", "algo.group_size=2", "algo.ppo_minibatches=4"],
         "algo.ppo_minibatches: 6 rows per step of stages.0 do not split into 4 minibatches"),
        (["algo.target_kl=-0.1"], "algo.target_kl: must be >= 0"),
        (["stages=[{kind: dpo}]", "trainer.micro_batch_size=3"], "DPO keeps each pair in one micro-batch"),
        (["env.name=tools", "stages=[{kind: dpo}]"], "stages.0 would pair whole episodes for DPO"),
        (["stages=[{kind: sft}, {kind: average, source: sfft}]"],
         "stages.1.source: 'sfft' is not an earlier stage; expected one of ['01_sft']"),
        # a branch starts from an earlier policy; a reward model from an earlier policy or a checkpoint folder
        (["stages=[{kind: sft}, {kind: reward_model, name: rm}, {kind: grpo, start: rm}]"],
         "stages.2.start: 'rm' is not an earlier stage's policy; expected one of ['00_init', '01_sft']"),
        (["stages=[{kind: grpo, start: 02_sft}, {kind: sft}]"], "stages.0.start: '02_sft' is not an earlier stage"),
        (["stages=[{kind: sft}, {kind: sft, save_every: 1}, {kind: average, start: 01_sft}]"],
         "stages.2.start: an average stage averages the snapshots of `source`"),
        (["stages=[{kind: reward_model, model: /no/such/model}]"],
         "stages.0.model: '/no/such/model' is neither an earlier stage's policy nor a Hugging Face checkpoint folder"),
        (["stages=[{kind: sft, model: 00_init}]"], "stages.0.model: sft stages do not read it (only reward_model"),
        (["trainer.lr_schedule=exp"], "trainer.lr_schedule: 'exp' is not one of constant, linear, cosine"),
        # a field the stage's kind does not read (rlkit.recipe.stage_kinds) would be silently ignored
        (["stages=[{kind: grpo, teacher: ckpt}]"],
         "stages.0.teacher: grpo stages do not read it (only distill stages do); remove it"),
        (["stages=[{kind: sft, pairs: online}]"], "stages.0.pairs: sft stages do not read it (only dpo, reward_model stages do)"),
        (["stages=[{kind: ppo, samples: 4}]"], "stages.0.samples: ppo stages do not read it (only dpo, rft, distill"),
        (["stages=[{kind: dpo, batch_size: 3}]", "cluster.backend=ray", "cluster.trainer_ranks=2"],
         "stages.0.batch_size: 3 rows per step do not split evenly over cluster.trainer_ranks=2"),
        # joining a cluster
        (["cluster.backend=ray", "cluster.placement=packed"],
         "cluster.placement: 'packed' is not one of pack, spread, strict_pack, strict_spread"),
        (["cluster.address=auto"], "cluster.address: only a Ray run joins a cluster"),
        (["cluster.backend=ray", "cluster.runtime_env={env_var: {A: 1}}"], "cluster.runtime_env: unknown key 'env_var'"),
        (["cluster.placement_timeout_s=0"], "cluster.placement_timeout_s: must be > 0"),
        # engines that span GPUs; vLLM's own engine arguments
        (["rollout.tensor_parallel_size=2"],
         "cluster.gpus_per_engine: 0 GPUs for an engine of rollout.tensor_parallel_size=2, which runs one worker per "
         "GPU; set cluster.gpus_per_engine=2"),
        (["cluster.gpus_per_engine=4", "rollout.tensor_parallel_size=2"], "set cluster.gpus_per_engine=2"),
        (["cluster.gpus_per_engine=2"], "an engine of rollout.tensor_parallel_size=1"),
        (["rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size: must be > 0, got 0"),
        (["rollout.max_num_seqs=0"], "rollout.max_num_seqs: must be > 0, got 0"),
        (["rollout.gpu_kv_cache_gib=-1"], "rollout.gpu_kv_cache_gib: must be >= 0, got -1"),
        (["rollout.engine_kwargs={dtype: half}"],
         "rollout.engine_kwargs.dtype: rlkit sets this engine argument itself; set rollout.dtype instead and remove it"),
        (["rollout.engine_kwargs={tensor_parallel_size: 2}"], "set rollout.tensor_parallel_size instead"),
        (["rollout.engine_kwargs={enable_prefix_cachng: false}"],
         "rollout.engine_kwargs.enable_prefix_cachng: not an engine argument of the installed vLLM (EngineArgs); did "
         "you mean 'enable_prefix_caching'? Fix or remove it"),
        # reward models: the stage and the reward (rlkit.recipe.checks.check_model_reward)
        (["stages=[{kind: reward_model, pairs: online}]"], "stages.0.pairs: 'online' is not one of dataset, policy"),
        (["stages=[{kind: reward_model, data: {format: stepwise}}]"],
         "stages.0.pairs: a process reward model (data.format stepwise) trains on a stepwise dataset"),
        (["stages=[{kind: reward_model, save_every: 5}]"], "stages.0.save_every: snapshots are policy checkpoints"),
        (["stages=[{kind: reward_model, teacher: x}]"], "stages.0.teacher: reward_model stages do not read it"),
        (["algo.rm_center_coef=-1", "stages=[{kind: reward_model}]"], "algo.rm_center_coef: must be >= 0"),
        (["data.format=stepwise"], "data.format: 'stepwise' is a reward_model stage's own data"),
        (["data.step_separator=''"], "data.step_separator: empty; a process reward model reads each step's score"),
        (["reward.rewards=[{name: math, path: rm}]"], "reward.rewards[0].path: only a reward with name: model reads it"),
        (["reward.rewards=[{name: math}, {name: model}]"], "reward.rewards[1].path: name: model needs the reward model"),
        (["reward.rewards=[{name: math}, {name: model, path: rn}]", "stages=[{kind: reward_model, name: rm}]"],
         "reward.rewards[1].path: 'rn' is neither a reward model folder (with config.json) nor a reward_model stage "
         "of this recipe (those: ['rm'])"),
        (["reward.rewards=[{name: math}, {name: model, path: rm}]", "stages=[{kind: grpo}, {kind: reward_model, name: rm}]"],
         "stages.0: a grpo stage scores its samples with reward.rewards, but reward.rewards[1] is the reward model "
         "stages.1 trains later"),
        (["reward.rewards=[{name: model, path: 01_reward_model}]", "stages=[{kind: reward_model}, {kind: grpo}]"],
         "reward.rewards: every reward is a reward model a stage trains later"),
        # scaling the other workers
        (["cluster.backend=ray", "cluster.scorer_actors=0"], "cluster.scorer_actors: must be > 0, got 0"),
        (["cluster.backend=ray", "cluster.scorer_actors=1.5"], "cluster.scorer_actors"),  # an int, by its type
        (["cluster.scorer_actors=2"], "cluster.scorer_actors: more than one scorer actor needs cluster.backend=ray"),
        (["ref.placement=ranks"], "ref.placement: 'ranks' is not one of trainer, actor"),
    ],
)
def test_bad_overrides_name_the_key(overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert expected in str(err.value)


def test_typo_in_yaml_names_file_and_closest_key(tmp_path):
    path = write(tmp_path, "rollout:\n  max_new_tokns: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "Did you mean 'max_new_tokens'?" in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_missing_dataset_file_names_field(tmp_path):
    with pytest.raises(RecipeError, match="data.source: file .*missing.jsonl' not found"):
        load_recipe(None, [f"data.source={tmp_path}/missing.jsonl"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_recipe(None, ["stages.0.steps=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_recipe(path) == cfg


def test_a_branch_and_a_reward_models_own_backbone_load():
    cfg = load_recipe(None, ["stages=[{kind: sft, name: warm}, {kind: sft, name: long}, "
                             "{kind: reward_model, start: warm, model: long}, {kind: grpo}, {kind: dpo, start: 00_init}]"])
    assert (cfg.stages[2].start, cfg.stages[2].model, cfg.stages[4].start) == ("warm", "long", "00_init")


def test_quickstart_recipe_is_valid():
    cfg = load_recipe("recipes/quickstart.yaml")
    assert [s.kind for s in cfg.stages] == ["sft", "dpo", "grpo"]


def test_stage_options_are_checked():
    from rlkit.recipe import RecipeConfig, StageConfig, validate

    bad = [
        ({"kind": "rft", "keep": "most"}, "stages.0.keep"),
        ({"kind": "dpo", "pairs": "live"}, "stages.0.pairs"),
        ({"kind": "dpo", "pairs": "online", "rounds": 5, "steps": 3}, "at least one step per round"),
        ({"kind": "distill", "teacher": "/no/such/teacher"}, "stages.0.teacher"),
        ({"kind": "average"}, "needs an earlier stage"),
        ({"kind": "average", "method": "median", "source": "x"}, "stages.0.method"),
    ]
    for fields, message in bad:
        with pytest.raises(RecipeError, match=message):
            validate(RecipeConfig(stages=[StageConfig(**fields)]))


def test_stage_data_overrides_the_recipes_and_is_checked_at_load():
    cfg = load_recipe(None, ["data.system_prompt=Be brief.", "data.num_eval=7",
                             "stages=[{kind: sft, data: {prompt_template: 'Q: {prompt}'}}, {kind: grpo}]"])
    assert cfg.stage_data(0).prompt_template == "Q: {prompt}" and cfg.stage_data(0).system_prompt == "Be brief."
    assert cfg.stage_data(0).num_eval == 7 and cfg.stage_data(1) == cfg.data
    bad = [
        ("stages=[{kind: sft, data: {sorce: x.jsonl}}]", "stages.0.data: unknown key 'sorce'.*Did you mean 'source'"),
        ("stages=[{kind: sft, data: {num_train: many}}]", "stages.0.data: bad value for 'num_train'"),
        ("stages=[{kind: sft, data: {source: /no/such.jsonl}}]", "stages.0.data.source: file '/no/such.jsonl' not"),
        ("stages=[{kind: sft, data: {format: chat}}]", "stages.0.data.format: 'chat' is not one of auto"),
        ("data.prompt_template='Solve {problem}'", "data.prompt_template: .*may hold only the field"),
        ("data.prompt_template=Solve it", "data.prompt_template: .*has no {prompt}"),
        ("data.truncation=middle", "data.truncation: 'middle' is not one of drop"),
        ("data.chat_template=chatml", "data.chat_template: 'chatml' is not one of auto, none"),
    ]
    for override, message in bad:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, [override])
    load_recipe(None, ["data.source=openai/gsm8k"])  # a hub name is checked when it is read, not here


def test_gspo_dr_grpo_and_dpo_length_normalisation_load():
    gspo = load_recipe(None, ["algo.ratio_level=sequence", "algo.loss_agg=seq-mean-token-mean"]).algo
    assert (gspo.ratio_level, gspo.loss_agg) == ("sequence", "seq-mean-token-mean")
    assert load_recipe(None, ["algo.scale_rewards=false", "algo.loss_agg=seq-mean-token-sum-norm"]).algo.loss_agg
    # IPO averages log-ratios per token unless told not to; sigmoid DPO sums them unless told to average
    assert load_recipe(None, ["algo.dpo_loss=ipo"]).algo.dpo_length_normalized
    assert not load_recipe(None, ["algo.dpo_loss=ipo", "algo.dpo_length_normalize=false"]).algo.dpo_length_normalized
    assert not load_recipe().algo.dpo_length_normalized
    assert load_recipe(None, ["algo.dpo_length_normalize=true"]).algo.dpo_length_normalized


def test_a_stage_schedules_its_learning_rate_over_its_optimizer_steps():
    cfg = load_recipe(None, ["algo.ppo_epochs=2", "algo.ppo_minibatches=2",
                             "stages=[{kind: sft, steps: 5}, {kind: grpo, steps: 5, batch_size: 4}]"])
    assert [stage_updates(cfg, i) for i in range(2)] == [5, 20]  # GRPO: 2 epochs x 2 minibatches per step


def test_an_engine_over_two_gpus_with_vllms_own_arguments_loads():
    cfg = load_recipe(None, ["rollout.tensor_parallel_size=2", "cluster.gpus_per_engine=2", "rollout.max_num_seqs=64",
                             "rollout.gpu_kv_cache_gib=8", "rollout.engine_kwargs={enable_prefix_caching: false}"])
    assert cfg.rollout.engine_kwargs == {"enable_prefix_caching": False}
    assert (cfg.rollout.tensor_parallel_size, cfg.cluster.gpus_per_engine, cfg.rollout.max_num_seqs) == (2, 2, 64)
    load_recipe(None, ["cluster.gpus_per_engine=0.5"])  # engines sharing a GPU, as before


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["reward.gold=[{weight: 1.0}]"], "reward.gold[0]: give a built-in name"),
        (["reward.gold_window=1"], "reward.gold_window: the gap's trend is a slope over at least 2 steps"),
        (["reward.stop_on_gold_drop=2", "logging.eval_every=5", "stages=[{kind: grpo}]"],
         "reward.stop_on_gold_drop: watches the gold reward"),
        (["reward.stop_on_gold_drop=2", "reward.gold=[{name: math}]", "logging.eval_every=5"],
         "stages that climb the rewards step by step (grpo, ppo) and this recipe has none"),
        (["reward.stop_on_gold_drop=2", "reward.gold=[{name: math}]", "stages=[{kind: grpo}]"],
         "logging.eval_every is 0"),
        (["reward.stop_on_gold_drop=-1"], "reward.stop_on_gold_drop: must be >= 0"),
        (["logging.best_metric=gold/accuracy"], "logging.best_metric"),  # no gold rewards to take it from
    ],
)
def test_gold_monitor_settings_are_checked_at_load(overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, overrides)
    assert expected in str(err.value)


def test_gold_rewards_load_beside_the_trained_ones():
    cfg = load_recipe(None, ["reward.rewards=[{name: format, kwargs: {require_think: false}}]",
                             "reward.gold=[{name: math}]", "reward.stop_on_gold_drop=3", "logging.eval_every=10",
                             "stages=[{kind: sft}, {kind: grpo}]",
                             "logging.best_metric=gold/accuracy"])
    assert [s.name for s in cfg.reward.gold] == ["math"] and cfg.reward.stop_on_gold_drop == 3


def test_quickstart_rm_recipe_trains_on_the_reward_model_with_the_verifier_as_gold():
    cfg = load_recipe("recipes/quickstart_rm.yaml")
    assert [s.kind for s in cfg.stages] == ["sft", "sft", "reward_model", "grpo"]
    sft, rm_base, rm, grpo = cfg.stages
    assert (rm.start, rm.model) == (sft.name, rm_base.name)  # pairs from the SFT model, on the longer-trained one
    assert grpo.start == rm_base.name  # GRPO from the longer-trained one, as the verifier baseline in the README
    trained = [s for s in cfg.reward.rewards if s.weight]
    assert [(s.name, s.path) for s in trained] == [("model", rm.name)]  # the only reward trained on
    assert [s.name for s in cfg.reward.gold] == ["math"]


def test_the_weight_transfer_is_one_the_devices_have():
    assert load_recipe(None).rollout.weight_transfer == "auto"  # nccl with CUDA, gloo without
    load_recipe(None, ["rollout.weight_transfer=gloo"])
    load_recipe(None, ["rollout.weight_transfer=nccl", "cluster.backend=ray", "cluster.gpus_per_engine=1",
                       "cluster.gpus_per_trainer=1"])
    bad = [
        (["rollout.weight_transfer=tcp"], "rollout.weight_transfer: 'tcp' is not one of auto, gloo, nccl, ipc, file"),
        (["rollout.weight_transfer=nccl", "cluster.backend=ray"], "'nccl' needs GPUs on the trainer and the engines"),
        (["rollout.weight_transfer=ipc", "cluster.backend=ray"], "'ipc' shares one GPU .* only cluster.backend=local"),
        (["rollout.sync_bucket_mb=0"], "rollout.sync_bucket_mb"),
    ]
    for overrides, message in bad:
        with pytest.raises(RecipeError, match=message):
            load_recipe(None, overrides)
