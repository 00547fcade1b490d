"""Wiring workers into groups, in this process or as Ray actors. The only module that imports ray (with
rlkit.runtime.placement, its helper for clusters of several nodes: joining, placement groups, rendezvous, shared
storage; and rlkit.runtime.engine_client, through which trainer rank 0 drives the engines during a weight transfer).

Workers are plain classes (rollout.VllmRollout, rewards.Scorer, rlkit.training.reference.ReferenceModel,
rlkit.training.trainer.ShardedTrainer). Here they are made remote with `ray.remote(...)(Cls)`; the groups of
rlkit.runtime.groups (re-exported here) give the controller one interface either way, so the stage loops run
unchanged in unit tests and on a cluster.
The leaf packages (rollout/, rewards/) take their own configs, which the recipe's sections become here
(`engine_config`, `rlkit.runtime.scoring.scorer_config`); they never import rlkit.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from rlkit.recipe import RecipeConfig, RecipeError, RewardConfig, RolloutConfig
from rlkit.runtime import placement
from rlkit.runtime.groups import (RanksReference, RolloutPool, SharedBatches, TrainerGroup, _as_is,  # noqa: F401
                                  _local_resolve, _Remote)
from rlkit.runtime.scoring import ScorerGroup, build_scorer, scorer_config, scorer_cpus
from rlkit.rewards.scorer import Scorer
from rlkit.rollout import EngineConfig

log = logging.getLogger(__name__)


class Cluster:
    """Makes the workers of a run, locally or as Ray actors, from the recipe's `cluster` section."""

    def __init__(self, cfg: RecipeConfig):
        self.cfg = cfg
        self.ray = None
        if cfg.cluster.backend == "ray":
            import ray

            if not ray.is_initialized():
                c = cfg.cluster
                # the policy's and a critic's ranks, the engines, the reference and the scorer's worker processes
                wanted = (2 * c.trainer_ranks * c.cpus_per_trainer + c.rollout_engines * c.cpus_per_engine + 1
                          + c.scorer_actors * scorer_cpus(cfg.reward))
                placement.init_ray(ray, c, wanted)
            self.ray = ray
        self.share = SharedBatches(self.ray.put) if self.ray else _as_is  # a step's batches, put once

    def check_storage(self, run_dir: Path) -> None:
        """On Ray: every node must see the run folder (logging.output_dir), before any worker starts; a node that
        cannot fails the run in one line naming it. Checkpoints, resume points and the first model are read there."""
        if self.ray is not None:
            placement.check_shared_storage(self.ray, run_dir)

    def _actor(self, cls: type, num_cpus: float, num_gpus: float, env: dict | None = None):
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if env:  # merged into cluster.runtime_env's env_vars by Ray
            options["runtime_env"] = {"env_vars": env}
        return self.ray.remote(**options)(cls)

    def _place(self, what: str, count: int, cpus: float, gpus: float, strategy: str):
        return placement.place(self.ray, what, count, placement.bundle(cpus, gpus), strategy,
                               self.cfg.cluster.placement_timeout_s)

    def _resolve(self) -> Callable[[list], list]:
        return self.ray.get if self.ray else _local_resolve

    def rollout_pool(self, model_path: str) -> RolloutPool:
        from rlkit.rollout.vllm_engine import VllmRollout, weight_transport

        cfg, c = self.cfg, self.cfg.cluster
        lora_rank = cfg.trainer.lora_rank if cfg.trainer.lora_sync == "adapter" else 0
        on_gpu = c.gpus_per_engine > 0 if self.ray else torch.cuda.is_available()
        engine = dataclasses.replace(engine_config(cfg.rollout),
                                     weight_transfer=weight_transport(cfg.rollout.weight_transfer, on_gpu))
        sync = dict(transport=engine.weight_transfer, timeout_s=engine.sync_timeout_s, bucket_mb=engine.sync_bucket_mb)
        args = (engine, model_path, cfg.model.max_seq_len)
        if self.ray is None:
            return RolloutPool([VllmRollout(*args, seed=cfg.trainer.seed, lora_rank=lora_rank)], **sync)
        group = self._place("rollout engines (cluster.rollout_engines)", c.rollout_engines, c.cpus_per_engine,
                            c.gpus_per_engine, "spread")
        actor = self._actor(VllmRollout, c.cpus_per_engine, c.gpus_per_engine)
        engines = [_Remote(actor.options(**placement.in_bundle(group, i)).remote(
            *args, seed=cfg.trainer.seed + i, lora_rank=lora_rank)) for i in range(c.rollout_engines)]
        pool = RolloutPool(engines, self._resolve(), **sync)
        pool.placement_group = group
        return pool

    def trainer_group(self, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0) -> TrainerGroup:
        """The policy's ranks; the learning rate follows trainer.lr_schedule over `total_steps` optimizer steps."""
        from rlkit.training.trainer import ShardedTrainer

        return self._group(ShardedTrainer, (self.cfg.trainer, model_path, lr, warmup_steps, total_steps))

    def reward_model_group(self, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0,
                           process: bool = False) -> TrainerGroup:
        """A reward model's ranks (a reward_model stage), from the policy checkpoint's body with a new score head:
        one label (Bradley-Terry), or two at step separators with `process` (a PRM)."""
        from rlkit.training.reward_model import RewardModelTrainer

        return self._group(RewardModelTrainer, (self.cfg.trainer, model_path, lr, warmup_steps, total_steps, process))

    def critic_group(self, model_path: str, lr: float, warmup_steps: int, total_steps: int = 0) -> TrainerGroup:
        """The PPO critic, sharded like the policy (its ranks form their own process group)."""
        from rlkit.training.critic import CriticTrainer

        return self._group(CriticTrainer, (self.cfg.trainer, model_path, lr, warmup_steps, total_steps))

    def _group(self, cls: type, args: tuple) -> TrainerGroup:
        """`cluster.trainer_ranks` ranks of `cls`, each told its rank and the rendezvous address."""
        c = self.cfg.cluster
        if self.ray is None:
            return TrainerGroup([cls(*args)])
        group = self._place(f"{cls.__name__} group (cluster.trainer_ranks)", c.trainer_ranks, c.cpus_per_trainer,
                            c.gpus_per_trainer, c.placement)

        def start(env: dict[str, str]) -> list:  # env: rank 0's node and a port free there
            actor = self._actor(cls, c.cpus_per_trainer, c.gpus_per_trainer, env)
            return [actor.options(**placement.in_bundle(group, r)).remote(*args, rank=r, world_size=c.trainer_ranks)
                    for r in range(c.trainer_ranks)]

        try:
            workers = [_Remote(handle) for handle in placement.start_ranks(self.ray, group, start)]
        except BaseException:  # the ranks are stopped; their reservation goes too
            if group is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(group)
            raise
        trainers = TrainerGroup(workers, self._resolve(), self.share)
        trainers.placement_group = group
        return trainers

    def reference(self, model_path: str, trainers: TrainerGroup | None = None):
        """The stage's frozen reference, loaded from `model_path` (the stage's starting model): on the policy's
        ranks `trainers`, sharded like the policy (ref.placement=trainer), or one unsharded worker (actor)."""
        from rlkit.training.reference import ReferenceModel

        cfg = self.cfg
        if cfg.ref.placement == "trainer":
            if trainers is None:
                raise ValueError("ref.placement=trainer: the reference needs the policy's trainer group")
            trainers._resolve([w.load_reference(cfg.ref, model_path) for w in trainers.workers])
            return RanksReference(trainers)
        t = cfg.trainer
        args = (cfg.ref, model_path, t.micro_batch_size, t.logprob_impl, t.micro_batch_tokens, t.packing,
                t.attn_implementation, t.compile)
        if self.ray is None:
            return ReferenceModel(*args)
        return _Blocking(self._actor(ReferenceModel, 1, self.cfg.cluster.gpus_per_trainer).remote(*args), self.ray.get,
                         self.share)  # the step's tokens by the ref the trainer ranks got

    def scorer(self, reward: RewardConfig | None = None):
        """The scorer of `reward` (default: the recipe's reward section; rlkit.runtime.scoring.live_rewards)."""
        reward = reward or self.cfg.reward
        if self.ray is None:
            return build_scorer(reward)  # a reward that cannot be built is a RecipeError
        c = self.cfg.cluster  # a batched reward's engine (the LLM judge) becomes an actor of its own
        make_engine = functools.partial(judge_engine_actor, c.gpus_per_engine)
        # each scorer reserves the CPUs its worker processes use (Ray would not count them), in a placement group
        # spread over the nodes: a cluster whose nodes could never hold them fails here in one line, one without
        # the free CPUs after cluster.placement_timeout_s, rather than waiting for ever. A reward model runs in the
        # scorer's own process: it takes an engine's GPUs
        cpus, what = scorer_cpus(reward), "reward scorers (cluster.scorer_actors x reward.num_workers CPUs)"
        gpus = c.gpus_per_engine if any(s.name == "model" and not s.import_path for s in reward.rewards) else 0
        problem = placement.room_error(what, c.scorer_actors, cpus, placement.node_cpus(self.ray),
                                       "lower cluster.scorer_actors or reward.num_workers, or add nodes")
        if problem:
            raise RecipeError(problem)
        group = self._place(what, c.scorer_actors, cpus, gpus, "spread")
        actor = self._actor(Scorer, cpus, gpus)
        handles = [actor.options(**placement.in_bundle(group, i)).remote(scorer_config(reward), make_engine)
                   for i in range(c.scorer_actors)]
        scorers = ScorerGroup([_Remote(h) for h in handles], self.ray.get)
        scorers.placement_group = group  # removed with the actors when a stage's reward model replaces the scorer
        try:  # the rewards are built in the actors' constructors: a bad one fails here, not at the first score
            self.ray.get([h.__ray_ready__.remote() for h in handles])
        except self.ray.exceptions.RayActorError as e:
            self.release(scorers)
            raise RecipeError(creation_error(str(e))) from e
        return scorers

    def release(self, *workers) -> None:
        """Stop actors of a finished stage (local workers are simply dropped)."""
        if self.ray is None:
            return
        for w in workers:
            if w is None:  # a worker the stage did not need (GRPO without a reference)
                continue
            if isinstance(w, RanksReference):  # its ranks are the policy's, released with the stage's end
                w.release()
                continue
            for handle in (getattr(w, "workers", None) or getattr(w, "engines", None) or getattr(w, "scorers", None)
                           or [w]):
                self.ray.kill(handle.actor)
            if getattr(w, "placement_group", None) is not None:  # its reservation goes with its actors
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(w.placement_group)

    def shutdown(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()


class _Blocking(_Remote):
    """An actor handle used like a local object: each call waits for its result. `share` stands in for a batch
    argument (SharedBatches: its object ref)."""

    def __init__(self, handle: Any, get: Callable, share: Callable = _as_is):
        super().__init__(handle)
        self._get, self._share = get, share

    def __getattr__(self, name: str) -> Callable:
        method = getattr(self.actor, name).remote
        return lambda *args, **kwargs: self._get(method(*map(self._share, args),
                                                        **{k: self._share(v) for k, v in kwargs.items()}))


def engine_config(rollout: RolloutConfig) -> EngineConfig:
    """The recipe's `rollout` section as an engine's own config."""
    return EngineConfig(temperature=rollout.temperature, top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens,
                        dtype=rollout.dtype, kv_cache_gib=rollout.kv_cache_gib,
                        gpu_memory_utilization=rollout.gpu_memory_utilization, enforce_eager=rollout.enforce_eager,
                        sync_dir=rollout.sync_dir, sync_timeout_s=rollout.sync_timeout_s,
                        gpu_kv_cache_gib=rollout.gpu_kv_cache_gib, tensor_parallel_size=rollout.tensor_parallel_size,
                        max_num_seqs=rollout.max_num_seqs, engine_kwargs=dict(rollout.engine_kwargs),
                        weight_transfer=rollout.weight_transfer, sync_bucket_mb=rollout.sync_bucket_mb)


def creation_error(text: str) -> str:
    """The one line a user needs from a Ray actor's creation failure (`text`: the error's message, which ends with
    the constructor's exception as `Type: message`): a reward's own RewardConfigError as it is (it names the field
    and the fix), anything else prefixed with where it happened.

    >>> creation_error("The actor died ...\\n  File x\\nrewards.registry.RewardConfigError: reward.rewards[0].name: bad")
    'reward.rewards[0].name: bad'
    """
    last = text.strip().splitlines()[-1] if text.strip() else text
    kind, _, message = last.partition(": ")
    if kind.endswith("RewardConfigError") and message:
        return message
    return f"reward: the scorer could not start ({last})"


def judge_engine_actor(num_gpus: float, *engine_args):
    """A judge's VllmRollout as a Ray actor; called inside the scorer actor (rewards.Scorer's `make_engine`).
    It asks for no CPU of its own: it runs only while the scorer actor, which holds one, waits on it."""
    import ray
    from rlkit.rollout.vllm_engine import VllmRollout

    handle = ray.remote(num_cpus=0, num_gpus=num_gpus)(VllmRollout).remote(*engine_args)
    ray.get(handle.__ray_ready__.remote())  # an engine that cannot start fails the scorer's construction
    return _Blocking(handle, ray.get)



def _free_port() -> int:
    """A loopback port free now (one-process groups in tests; a cluster's rendezvous is rlkit.placement's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
