"""The trainer group sharded with FSDP2 over 2 real ranks (Ray actors, gloo) equals the 1-rank trainer; the recipe's
sections become the leaf workers' own configs."""

import dataclasses

import pytest
import torch

from rlkit.runtime.cluster import Cluster, TrainerGroup, engine_config
from rlkit.recipe import (ClusterConfig, ModelConfig, RecipeConfig, RecipeError, RewardConfig, RewardSpec,
                          RolloutConfig, TrainerConfig)
from rlkit.training.losses import PolicyLoss, SFTLoss, token_normalizer
from rlkit.training.modeling import init_model, save_checkpoint
from rlkit.training.batches import PairBatch, PolicyBatch, SFTBatch, TokenBatch
from rlkit.rollout import EngineConfig
from tests.training.test_trainer import EMBED, HEAD, assert_saved_tied, random_batch

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def clusters():
    """The same trainer settings in this process (1 rank) and on Ray (2 ranks). The token budget cuts the test batch's
    rank shares into 3 and 4 micro-batches, so the ranks must agree on 4; checkpointed blocks recompute under FSDP2."""
    trainer = TrainerConfig(micro_batch_size=2, micro_batch_tokens=10, logprob_impl="torch", dtype="float64",
                            num_threads=1, gradient_checkpointing=True)
    local_cfg = RecipeConfig(trainer=trainer)
    ray_cfg = dataclasses.replace(local_cfg, cluster=ClusterConfig(backend="ray", trainer_ranks=2, cpus_per_trainer=0.5))
    cluster = Cluster(ray_cfg)
    yield Cluster(local_cfg), cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def groups(clusters, tmp_path_factory):
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    path = str(save_checkpoint(model, tok, tmp_path_factory.mktemp("m") / "ckpt", ""))
    local, cluster = clusters
    one = local.trainer_group(path, lr=1e-2, warmup_steps=1)
    two = cluster.trainer_group(path, lr=1e-2, warmup_steps=1)
    yield one, two
    cluster.release(two)


def assert_same_weights(a: TrainerGroup, b: TrainerGroup, tol=1e-9):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=tol, rtol=0), k


def test_two_ranks_equal_one_rank(groups):
    one, two = groups
    assert two.world_size == 2
    batch = random_batch(n=8, seed=3)
    # rows of 9 6 7 4 | 7 10 5 6 tokens: contiguous halves carry 26 and 28; balanced shares 27 each, so the ranks'
    # outputs come back permuted and the group must restore the batch's order
    assert [s.tolist() for s in two._split(batch)] == [[3, 4, 5, 7], [0, 1, 2, 6]]
    assert one._split(batch) is None
    assert torch.allclose(one.logprobs(batch), two.logprobs(batch), atol=1e-10)

    sft = SFTBatch(batch, float(batch.response_mask.sum()))
    u1, u2 = one.step(SFTLoss(), sft), two.step(SFTLoss(), sft)
    assert u1.stats.loss == pytest.approx(u2.stats.loss, rel=1e-9)
    assert u1.grad_norm == pytest.approx(u2.grad_norm, rel=1e-9)
    assert_same_weights(one, two)

    old = one.logprobs(batch)
    g = torch.Generator().manual_seed(0)
    noise = 0.05 * torch.randn(old.shape, generator=g, dtype=old.dtype) * batch.response_mask
    policy = PolicyBatch(
        batch, batch.response_mask, old, old + noise, old - noise, torch.randn(8, generator=g, dtype=old.dtype),
        float(token_normalizer(batch.response_mask, "token-mean")),
    )
    loss = PolicyLoss(kl_coef=0.1)
    for _ in range(2):
        m1, m2 = one.step(loss, policy).metrics(), two.step(loss, policy).metrics()
        assert m1.keys() == m2.keys()
        for key in m1:  # the ranks' stats add up to the 1-rank step's
            assert m1[key] == pytest.approx(m2[key], rel=1e-8, abs=1e-12), key
    assert_same_weights(one, two)


def test_tied_embeddings_on_two_ranks_equal_one_rank_and_save_tied(clusters, chat_model_path, tmp_path):
    """FSDP2 shards the tied embedding once (it is one Parameter of the root unit): its gradient sums both uses on
    every rank, and the gathered weights and the checkpoint keep embed_tokens and lm_head one tensor."""
    local, cluster = clusters
    one = local.trainer_group(chat_model_path, lr=1e-2, warmup_steps=1)
    two = cluster.trainer_group(chat_model_path, lr=1e-2, warmup_steps=1)
    try:
        batch = random_batch(n=8, seed=3)
        for group in (one, two):
            group.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum())))
        assert_same_weights(one, two)
        state = two.state_dict()
        assert torch.equal(state[HEAD], state[EMBED])
        assert_saved_tied(two.save(str(tmp_path / "ckpt"), chat_model_path, ""), state[EMBED])
    finally:
        cluster.release(two)


def test_uneven_split_is_refused(groups):
    _, two = groups
    with pytest.raises(ValueError, match="do not split evenly over 2 trainer ranks"):
        two.logprobs(random_batch(n=3))


def test_lora_adapter_gathers_from_two_ranks_like_one(tmp_path):
    """trainer.lora_sync=adapter gathers only the adapter from the shards: equal to the 1-rank trainer's."""
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    path = str(save_checkpoint(model, tok, tmp_path / "ckpt", ""))
    trainer = TrainerConfig(micro_batch_size=2, logprob_impl="torch", dtype="float64", num_threads=1,
                            lora_rank=4, lora_sync="adapter", gradient_checkpointing=True)
    local_cfg = RecipeConfig(trainer=trainer)
    ray_cfg = dataclasses.replace(local_cfg, cluster=ClusterConfig(backend="ray", trainer_ranks=2, cpus_per_trainer=0.5))
    one = Cluster(local_cfg).trainer_group(path, lr=1e-2, warmup_steps=1)
    cluster = Cluster(ray_cfg)
    two = cluster.trainer_group(path, lr=1e-2, warmup_steps=1)
    try:
        batch = random_batch(n=8, seed=5)
        for group in (one, two):
            for _ in range(2):
                group.step(SFTLoss(), SFTBatch(batch, float(batch.response_mask.sum())))
        a1, a2 = one.adapter_state_dict(), two.adapter_state_dict()
        assert a1.keys() == a2.keys() and a1
        for k in a1:
            assert torch.allclose(a1[k], a2[k], atol=1e-9, rtol=0), k
        assert any(k.endswith("lora_B.weight") and a1[k].abs().max() > 0 for k in a1)  # it trained
        b1, b2 = one.base_state_dict(), two.base_state_dict()
        assert b1.keys() == b2.keys() == set(model.state_dict())
        assert all(torch.equal(b1[k], b2[k]) for k in b1)
    finally:
        cluster.release(two)


def test_engine_config_is_the_recipes_rollout_section():
    """Engines take their own config (rollout/ imports nothing of rlkit); its defaults agree with the recipe's."""
    assert engine_config(RolloutConfig()) == EngineConfig()
    rollout = RolloutConfig(temperature=0.7, top_p=0.9, max_new_tokens=5, dtype="bfloat16", kv_cache_gib=2.0,
                            gpu_memory_utilization=0.3, enforce_eager=False, sync_dir="/tmp/x", sync_timeout_s=9.0,
                            weight_transfer="file", sync_bucket_mb=64.0)
    carried = {f.name: getattr(rollout, f.name) for f in dataclasses.fields(EngineConfig)}
    assert all(value != getattr(EngineConfig(), name) for name, value in carried.items())  # each one set above
    assert engine_config(rollout) == EngineConfig(**carried)


def test_a_reward_that_cannot_be_built_fails_the_local_scorer_as_a_recipe_error():
    """The runner makes the scorer before writing anything; the user gets the reward's one-line message."""
    cfg = RecipeConfig(reward=RewardConfig(rewards=[RewardSpec(name="mth")]))
    with pytest.raises(RecipeError, match=r"^reward.rewards\[0\].name: unknown reward 'mth'. Did you mean 'math'\?"):
        Cluster(cfg).scorer()


def test_ranks_share_rows_by_tokens_and_results_come_back_in_order():
    """In process, no Ray: a DPO batch's pairs go whole to balanced ranks, and per-row results return in order."""

    class Echo:  # a rank whose log-prob table is its rows' first tokens
        def logprobs(self, batch, temperature):
            return batch.input_ids[:, :1].double()  # (b, 1)

    # row i starts with token i; pairs of 12, 10, 2 and 4 tokens: contiguous shares carry 22 and 6 tokens.
    # Pairs longest first: 12 -> A; 10 -> B; 4 -> B (14); 2 -> A (14).
    lengths = torch.tensor([6, 6, 5, 5, 1, 1, 2, 2])
    mask = (torch.arange(6) < lengths[:, None]).long()  # (8, 6)
    tokens = TokenBatch(torch.arange(8)[:, None] * mask, mask, torch.zeros(8, 5))
    pairs = PairBatch(tokens, torch.zeros(8), num_pairs=4)
    group = TrainerGroup([Echo(), Echo()])
    assert [s.tolist() for s in group._split(pairs)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    shares = group._each(pairs, lambda w, rows: rows, group._split(pairs))
    assert [part.tokens.input_ids[:, 0].tolist() for part in shares] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    # rows alone: 6 -> A; 6 -> B; 5 -> A (11); 5 -> B (11); 2 -> A (13); 2 -> B (13); 1 -> A; 1 -> B (14 each)
    assert [s.tolist() for s in group._split(tokens)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert group.logprobs(tokens)[:, 0].tolist() == list(range(8))  # back in the batch's order
    with pytest.raises(ValueError, match=r"6 rows do not split evenly over 2 trainer ranks \(whole units of 2"):
        group._split(pairs.select(slice(0, 6)))  # 3 pairs: a rank would cut one


def test_a_reward_that_cannot_be_built_fails_the_ray_scorer_as_a_recipe_error(clusters):
    """On Ray the rewards are built in the scorer actor: the same one line as locally, when the actor starts."""
    _, cluster = clusters
    cfg = dataclasses.replace(cluster.cfg, reward=RewardConfig(rewards=[RewardSpec(name="mth")]))
    with pytest.raises(RecipeError, match=r"^reward.rewards\[0\].name: unknown reward 'mth'. Did you mean 'math'\?"):
        Cluster(cfg).scorer()


def test_two_ranks_resume_from_their_own_shards(groups, tmp_path):
    """Resume points are torch.distributed.checkpoint shards, one file per rank: loading them back and repeating a
    step repeats it exactly (weights, Adam moments, schedule); a 2-rank point refuses a 1-rank group."""
    one, two = groups
    batch = random_batch(n=8, seed=4)
    sft = SFTBatch(batch, float(batch.response_mask.sum()))
    written = {}
    for name, group in (("one", one), ("two", two)):
        written[name] = group.save_state(str(tmp_path / name))
    assert sorted(written["two"]) == ["dcp/.metadata", "rank0.pt", "rank1.pt"]
    assert sorted(p.name for p in (tmp_path / "two" / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    first = {name: (group.step(SFTLoss(), sft).stats.loss, group.state_dict())
             for name, group in (("one", one), ("two", two))}
    for name, group in (("one", one), ("two", two)):
        group.load_state(str(tmp_path / name))
        assert group.step(SFTLoss(), sft).stats.loss == first[name][0]
        again = group.state_dict()
        assert all(torch.equal(again[k], first[name][1][k]) for k in again), name
    assert_same_weights(one, two)
    with pytest.raises(RuntimeError, match="written by 2 trainer ranks, not 1"):
        one.load_state(str(tmp_path / "two"))


def test_ranks_are_placed_together_and_meet_at_rank0s_node(groups):
    """The ranks' placement group is reserved whole; their rendezvous is rank 0's node IP as Ray knows it (never
    127.0.0.1) and a port found free there."""
    _, two = groups
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(two.placement_group)
    assert table["strategy"] == "PACK" and len(table["bundles"]) == 2 and table["state"] == "CREATED"
    env = ray.get(two.workers[0].actor.__ray_call__.remote(
        lambda self: {k: __import__("os").environ[k] for k in ("MASTER_ADDR", "MASTER_PORT")}))
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    assert env["MASTER_ADDR"] == node["NodeManagerAddress"] and int(env["MASTER_PORT"]) > 0


def test_a_group_that_cannot_be_placed_fails_in_one_line_naming_it(clusters):
    _, cluster = clusters
    cfg = dataclasses.replace(cluster.cfg, cluster=dataclasses.replace(
        cluster.cfg.cluster, gpus_per_trainer=1.0, placement_timeout_s=1.0))
    with pytest.raises(RecipeError, match=r"^cluster: could not place the ShardedTrainer group \(cluster.trainer_"
                                          r"ranks\): 2 x \{'CPU': 0.5, 'GPU': 1.0\} with strategy pack"):
        Cluster(cfg).trainer_group("unused", lr=1e-2, warmup_steps=1)


def test_the_storage_check_passes_on_one_node_and_leaves_nothing(clusters, tmp_path):
    _, cluster = clusters
    cluster.check_storage(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_scorer_no_node_can_hold_fails_in_one_line_naming_it(clusters):
    """The scorer reserves its worker processes' CPUs in a placement group: more than any node has fails, not waits."""
    _, cluster = clusters
    cfg = dataclasses.replace(cluster.cfg, reward=RewardConfig(num_workers=64),
                              cluster=dataclasses.replace(cluster.cfg.cluster, placement_timeout_s=1.0))
    with pytest.raises(RecipeError, match=r"^cluster: could not place the reward scorer \(reward.num_workers CPUs on "
                                          r"one node\): 1 x \{'CPU': 64\}"):
        Cluster(cfg).scorer()
