"""The trainer group sharded with FSDP2 over 2 real ranks (Ray actors, gloo) equals the 1-rank trainer, and so does the
reference held on those ranks; several scorer actors score a batch as one scorer does; the recipe's sections become the
leaf workers' own configs."""

import dataclasses
import socket

import pytest
import torch

from rlkit.rewards.base import RewardResult, Sample, Verdict
from rlkit.rewards.scorer import RewardError, Scorer
from rlkit.runtime.cluster import Cluster, RanksReference, SharedBatches, TrainerGroup, engine_config
from rlkit.runtime.scoring import ScorerGroup, scorer_config, scorer_cpus
from rlkit.recipe import (ClusterConfig, ModelConfig, RecipeConfig, RecipeError, RefConfig, RewardConfig, RewardSpec,
                          RolloutConfig, TrainerConfig)
from rlkit.training.reference import ReferenceModel
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
def tiny_path(tmp_path_factory):
    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    return str(save_checkpoint(model, tok, tmp_path_factory.mktemp("m") / "ckpt", ""))


@pytest.fixture(scope="module")
def groups(clusters, tiny_path):
    path = tiny_path
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


def test_a_step_batch_goes_to_the_ranks_once_and_minibatches_equal_one_rank(clusters, groups):
    """On Ray a step's batch is put in the object store once, and the old log-probs and every minibatch step send
    its ref with each rank's rows; a minibatch step (its rows, its own normaliser) on 2 ranks equals 1 rank's."""
    _, cluster = clusters
    one, two = groups
    puts = []
    shared = SharedBatches(lambda batch: puts.append(batch) or ray.put(batch))  # counts Ray's real puts
    two = TrainerGroup(two.workers, ray.get, shared)
    batch = random_batch(n=8, seed=5)
    old = two.logprobs(batch)
    assert torch.allclose(one.logprobs(batch), old, atol=1e-10)
    policy = PolicyBatch(batch, batch.response_mask, old, old, old, torch.linspace(-1, 1, 8, dtype=old.dtype),
                         float(token_normalizer(batch.response_mask, "token-mean")))
    loss = PolicyLoss(kl_coef=0.1)
    for rows in (torch.tensor([6, 1, 3, 4]), torch.tensor([0, 2, 5, 7])):
        normalizer = float(token_normalizer(policy.mask[rows], "token-mean"))
        m1, m2 = one.step(loss, policy, rows, normalizer).metrics(), two.step(loss, policy, rows, normalizer).metrics()
        for key in m1:
            assert m1[key] == pytest.approx(m2[key], rel=1e-8, abs=1e-12), key
    assert_same_weights(one, two)
    assert [type(b) for b in puts] == [TokenBatch, PolicyBatch] and puts[1] is policy  # each once
    assert shared(policy) is shared(policy) and shared("not a batch") == "not a batch"
    assert cluster.share(policy) is cluster.share(policy)  # the cluster's own, which its groups and reference use


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
                            gpu_kv_cache_gib=4.0, tensor_parallel_size=2, max_num_seqs=64,
                            engine_kwargs={"enable_prefix_caching": False}, weight_transfer="file", sync_bucket_mb=64.0)
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
        def logprobs(self, batch, temperature, rows):
            return batch.input_ids[rows, :1].double()  # (b, 1)

    # row i starts with token i; pairs of 12, 10, 2 and 4 tokens: contiguous shares carry 22 and 6 tokens.
    # Pairs longest first: 12 -> A; 10 -> B; 4 -> B (14); 2 -> A (14).
    lengths = torch.tensor([6, 6, 5, 5, 1, 1, 2, 2])
    mask = (torch.arange(6) < lengths[:, None]).long()  # (8, 6)
    tokens = TokenBatch(torch.arange(8)[:, None] * mask, mask, torch.zeros(8, 5))
    pairs = PairBatch(tokens, torch.zeros(8), num_pairs=4)
    group = TrainerGroup([Echo(), Echo()])
    assert [s.tolist() for s in group._split(pairs)] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    shares = group._each(pairs, lambda w, whole, rows: whole.select(rows), group._split(pairs))
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


def test_ranks_start_again_on_another_port_when_theirs_was_taken(clusters, tiny_path, monkeypatch):
    """The port found free on rank 0's node can be taken before rank 0 binds it (here: by this test, listening on
    it): rank 0 fails with EADDRINUSE, and the ranks start again on a new port, which works."""
    from rlkit.runtime import placement

    _, cluster = clusters
    real, found = placement.rendezvous, []

    def rendezvous(ray, group):
        env = real(ray, group)
        found.append(env)
        return env | {"MASTER_PORT": str(taken.getsockname()[1])} if len(found) == 1 else env

    monkeypatch.setattr(placement, "rendezvous", rendezvous)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        two = cluster.trainer_group(tiny_path, lr=1e-2, warmup_steps=1)
    try:
        assert len(found) == 2 and two.world_size == 2
        assert torch.isfinite(two.logprobs(random_batch(n=4))).all()  # the ranks met on the second port
    finally:
        cluster.release(two)


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
    """The scorers reserve their worker processes' CPUs: more than the nodes could ever hold fails at once."""
    _, cluster = clusters
    cfg = dataclasses.replace(cluster.cfg, reward=RewardConfig(num_workers=4),
                              cluster=dataclasses.replace(cluster.cfg.cluster, scorer_actors=2))
    with pytest.raises(RecipeError, match=r"^cluster: the reward scorers \(cluster.scorer_actors x reward.num_workers "
                                          r"CPUs\) cannot fit: 2 x \{'CPU': 4\} but the cluster's nodes have CPU 6 "
                                          r"\(room for 1\); lower cluster.scorer_actors"):
        Cluster(cfg).scorer()


def test_a_reward_model_on_two_ranks_equals_one_rank(clusters, tmp_path):
    """A reward_model stage's ranks (rlkit.training.reward_model): the same scores, Bradley-Terry updates and saved
    sequence classifier on 2 FSDP2 ranks as on 1."""
    from transformers import AutoModelForSequenceClassification

    from rlkit.algorithms.reward_model import pair_batch
    from rlkit.training.reward_model import PairwiseLoss

    model, tok = init_model(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2))
    path = str(save_checkpoint(model, tok, tmp_path / "ckpt", ""))
    local, cluster = clusters
    one, two = local.reward_model_group(path, lr=1e-2, warmup_steps=1), cluster.reward_model_group(path, 1e-2, 1)
    try:
        g = torch.Generator().manual_seed(0)
        pairs = [(torch.randint(4, 90, (3,), generator=g).tolist(), torch.randint(4, 90, (k,), generator=g).tolist(),
                  torch.randint(4, 90, (5 - k,), generator=g).tolist(), 0.1 * k) for k in (1, 2, 3, 4)]
        batch = pair_batch(pairs, tok.pad_token_id)
        assert torch.allclose(one.scores(batch.tokens), two.scores(batch.tokens), atol=1e-10)
        for _ in range(2):
            u1, u2 = one.step(PairwiseLoss(0.1), batch), two.step(PairwiseLoss(0.1), batch)
            assert u1.stats.loss == pytest.approx(u2.stats.loss, rel=1e-9)
            assert u1.grad_norm == pytest.approx(u2.grad_norm, rel=1e-9)
        assert torch.allclose(one.scores(batch.tokens), two.scores(batch.tokens), atol=1e-9)
        saved = AutoModelForSequenceClassification.from_pretrained(two.save(str(tmp_path / "rm"), path, ""))
        hf = saved(input_ids=batch.tokens.input_ids, attention_mask=batch.tokens.attention_mask).logits[:, 0]
        assert torch.allclose(hf, one.scores(batch.tokens).sum(-1), atol=1e-9)  # float64 throughout
    finally:
        cluster.release(two)


class ShareProbe:
    """A batched user reward (run in the scorer's own process, no workers): its score is the prompt's number, an
    ERROR on prompt "5" when `fail_on_5`; its summary is over every sample it was shown."""

    def __init__(self, fail_on_5: bool = False):
        self.fail_on_5 = fail_on_5

    def score(self, sample: Sample) -> RewardResult:
        return self.score_batch([sample], None)[0]

    def score_batch(self, samples: list[Sample], engine) -> list[RewardResult]:
        return [RewardResult(0.0, Verdict.ERROR, info={"error": "five"}) if self.fail_on_5 and s.prompt == "5"
                else RewardResult(float(s.prompt), Verdict.CORRECT if int(s.prompt) % 3 else Verdict.WRONG)
                for s in samples]

    def summarize(self, verdicts: list[Verdict]) -> dict[str, float]:
        return {"shown": float(len(verdicts))}


def test_scorer_shares_come_back_in_order_and_combine_over_the_whole_batch():
    """In process, no Ray: 7 samples over 3 scorers (shares of 3, 3, 1) give exactly one scorer's output: scores in
    order, stats and the reward's summary over all 7, and a fault named by its index in the whole batch."""
    spec = RewardSpec(import_path="tests.runtime.test_cluster:ShareProbe")
    samples = [Sample(str(i), "") for i in range(7)]
    one = Scorer(scorer_config(RewardConfig(rewards=[spec])))
    group = ScorerGroup([Scorer(scorer_config(RewardConfig(rewards=[spec]))) for _ in range(3)])
    out = group.score(samples)
    assert out.scores == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert out == one.score(samples)
    assert out.stats["ShareProbe/shown"] == 7 and out.stats["verdict/wrong"] == 3  # 0, 3, 6
    assert out.stats["ShareProbe/std"] == pytest.approx(2.0)  # population std of 0..6 (a share's would be smaller)
    failing = RewardConfig(rewards=[dataclasses.replace(spec, kwargs={"fail_on_5": True})])
    group = ScorerGroup([Scorer(scorer_config(failing)) for _ in range(3)])
    with pytest.raises(RewardError, match="gave error on sample 5 "):
        group.score(samples)


def test_two_scorer_actors_score_in_order_each_reserving_its_pools_cpus(clusters):
    """On Ray: 2 scorer actors, spread, each reserving exactly the CPUs of the worker processes it spawns; a batch
    split across them comes back in order."""
    _, cluster = clusters
    reward = RewardConfig(num_workers=1)
    cfg = dataclasses.replace(cluster.cfg, reward=reward,
                              cluster=dataclasses.replace(cluster.cfg.cluster, scorer_actors=2))
    ray_cluster = Cluster(cfg)
    scorers = ray_cluster.scorer()
    try:
        from ray.util.placement_group import placement_group_table

        table = placement_group_table(scorers.placement_group)
        assert table["strategy"] == "SPREAD" and list(table["bundles"].values()) == [{"CPU": 1.0}] * 2
        spawned = ray.get([s.actor.__ray_call__.remote(lambda self: len(self._pool._workers))
                           for s in scorers.scorers])
        assert spawned == [scorer_cpus(reward)] * 2 == [1, 1]
        answers = ["4", "5", "6", "7", "8"]  # right, wrong, right, wrong, right: shares of 3 and 2
        samples = [Sample(f"{i}+{i}=", a, str(2 * i)) for i, a in zip((2, 2, 3, 3, 4), answers)]
        out = scorers.score(samples)
        assert [r.verdict for r in out.results] == [Verdict.CORRECT, Verdict.WRONG] * 2 + [Verdict.CORRECT]
        assert out.stats["verdict/correct"] == 3
    finally:
        scorers.close()
        ray_cluster.release(scorers)


def test_the_reference_on_the_trainer_ranks_equals_the_unsharded_reference(clusters, groups, tiny_path):
    """ref.placement=trainer: the 2 FSDP2 ranks hold the reference sharded and give the unsharded ReferenceModel's
    log-probs (float64, the same micro-batches); in process, on the policy's one rank, bit for bit."""
    local, cluster = clusters
    one, two = groups
    ref, t = RefConfig(dtype="float64"), cluster.cfg.trainer
    assert RefConfig().placement == "trainer"  # the default
    batch = random_batch(n=8, seed=5)
    expected = ReferenceModel(ref, tiny_path, t.micro_batch_size, t.logprob_impl, t.micro_batch_tokens, t.packing,
                              t.attn_implementation).logprobs(batch)
    for c, trainers in ((local, one), (cluster, two)):
        c = Cluster(dataclasses.replace(c.cfg, ref=ref))  # the same Ray, its recipe's reference in float64
        reference = c.reference(tiny_path, trainers)
        assert isinstance(reference, RanksReference)
        got = reference.logprobs(batch)
        if trainers is one:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
            held = ray.get(trainers.workers[0].actor.__ray_call__.remote(
                lambda self: [type(p).__name__ for p in self.reference.parameters()]))
            assert set(held) == {"DTensor"}  # each rank holds only its shards of every weight, also after a forward
        reference.release()  # what Cluster.release does with it: the ranks stay, the policy's
        with pytest.raises(RuntimeError, match="no reference on this rank"):
            trainers.ref_logprobs(batch)
